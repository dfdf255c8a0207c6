"""Deployment tooling, beside the serving code it deploys and imported by nothing below the
pipelines (docs/architecture.md, "Layers"): :mod:`~kuberank.deploy.canary` (``kubectl
kuberank canary``: canary rollouts through HTTPRoute weights), :mod:`~kuberank.deploy.chart`
(the Helm chart's README table and offline rendering) and :mod:`~kuberank.deploy.schema` (the
schemas the rendered custom resources are validated against)."""

"""The decorator every pipeline step uses for its kfp wrapper."""

from kfp import dsl

from kuberank.config import IMAGE


def step_component(**kwargs):
    """``@dsl.component`` on the kuberank image.

    Inside a running kfp task (``_KFP_RUNTIME=true``) ``kfp.dsl`` carries only the runtime
    types, so importing a step module there must not build components: the function is then
    returned unchanged.
    """
    if not hasattr(dsl, "component"):
        return lambda func: func
    kwargs.setdefault("base_image", IMAGE)
    return dsl.component(**kwargs)

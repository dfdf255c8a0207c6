"""Policies: the operator's rules on what a served model may return, versioned in the store.

``STORE/policy.json`` (:data:`kuberank.store.POLICY`), written and checked by
``kuberank policy set|check``, is read with the model (``load_checked_index``), so a new policy
is a new model version to serve and reload like any other. It holds the rules and their
``version`` (1, 2, ... : ``set`` counts up whenever the rules change) and ``fingerprint`` (of
the rules), which ``/readyz`` reports::

    {"format": "kuberank-policy/1", "version": 2, "fingerprint": "…",
     "blocked_items": ["1234"],                     never returned (ids not in the index: ignored)
     "blocked_terms": ["casino", "free money"],     whole words or phrases, any case
     "on_blocked_term": "reject",                   "reject": 422 at ``query``; "filter": the
                                                    terms are cut out of the query (nothing
                                                    left: no items)
     "caps": {"genres": 0.3}}                       at most ceil(share * k) items of a list per
                                                    value of the attribute (a list attribute:
                                                    per value it holds; no value: no cap)

Blocked items are excluded rows of retrieval, as a request filter's (serving/filters.py), so k
items still come back whenever k pass. Caps re-rank greedily after F (and MMR): the next best
item whose groups all have room is taken. With caps, retrieval hands F at least CAP_DEPTH * k
candidates (:func:`candidate_count`); a list comes back shorter than k only when those hold
too few items within the caps. Every decision is counted in
``kuberank_policy_decisions_total{policy,action}`` (:data:`DECISIONS`).

A policy file that does not parse, or a cap on an attribute the index does not hold, refuses
the model version at load (:class:`PolicyError`, naming the field): a deploy fails before any
replica changes, a replica's reload keeps serving the old version.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from kuberank.calibration import item_groups
from kuberank.errors import KuberankError
from kuberank.item_index import META_FILE
from kuberank.storage import materialize, materialize_if_present, publish, write_json
from kuberank.store import INDEX_DIR, POLICY, store_path

POLICY_FORMAT = "kuberank-policy/1"
META_KEYS = ("format", "version", "fingerprint")
REJECT, FILTER = "reject", "filter"
MAX_BLOCKED_ITEMS = 1_000_000
MAX_TERMS = 10_000
# with MMR, the caps walk the first CAP_DEPTH * k of MMR's order, then F's order
CAP_DEPTH = 4

# (policy, action) of kuberank_policy_decisions_total: a query refused (422) or cut, a blocked
# item that would have been a candidate, an item a cap moved out of the top k
DECISIONS = (
    ("blocked_terms", "rejected"),
    ("blocked_terms", "filtered"),
    ("blocked_items", "removed"),
    ("caps", "displaced"),
)

_Id = Annotated[str, StringConstraints(min_length=1, max_length=128)]
_Term = Annotated[str, StringConstraints(min_length=1, max_length=128, pattern=r"\w")]
_Name = Annotated[str, StringConstraints(min_length=1, max_length=64)]
_Share = Annotated[float, Field(gt=0.0, le=1.0)]


class PolicyRules(BaseModel):
    """What an operator writes (``kuberank policy set --file``)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    blocked_items: list[_Id] = Field(default_factory=list, max_length=MAX_BLOCKED_ITEMS)
    blocked_terms: list[_Term] = Field(default_factory=list, max_length=MAX_TERMS)
    on_blocked_term: Literal["reject", "filter"] = REJECT
    caps: dict[_Name, _Share] = Field(default_factory=dict)


class PolicyError(KuberankError):
    """A policy that cannot be served; ``field`` names the part (``caps.rating``)."""

    def __init__(self, where: str, field: str, problem: str):
        self.field, self.problem = field, problem
        super().__init__(f"{where}: {field}: {problem}")


class BlockedQuery(KuberankError):
    """A query with a term the policy blocks, under ``on_blocked_term: reject``."""


def fingerprint(rules: PolicyRules) -> str:
    canonical = json.dumps(rules.model_dump(), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def parse_rules(text: str, where: str) -> tuple[PolicyRules, dict]:
    """The rules of a policy file's text, and its metadata (format, version, fingerprint)."""
    try:
        raw = json.loads(text)
    except ValueError as exc:
        raise PolicyError(where, "body", f"not valid JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise PolicyError(where, "body", "a policy is a JSON object")
    meta = {k: raw.pop(k) for k in META_KEYS if k in raw}
    try:
        rules = PolicyRules.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or "body"
        raise PolicyError(where, field, first["msg"]) from None
    return rules, meta


def check_rules(rules: PolicyRules, fields: dict[str, str], where: str) -> None:
    """Refuse caps on attributes the index does not hold (``fields``: name -> type)."""
    for name in rules.caps:
        if name not in fields:
            held = ", ".join(sorted(fields)) or "none"
            raise PolicyError(
                where, f"caps.{name}", f"the index holds no attribute {name!r} (it holds: {held})"
            )


def parse_stored(text: str, where: str) -> tuple[PolicyRules, int, str]:
    """A stored policy: its rules, version and fingerprint (checked against the rules)."""
    rules, meta = parse_rules(text, where)
    if meta.get("format") != POLICY_FORMAT:
        raise PolicyError(where, "format", f"{meta.get('format')!r} is not {POLICY_FORMAT!r}")
    version = meta.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise PolicyError(where, "version", f"{version!r} is not a positive integer")
    if meta.get("fingerprint") != fingerprint(rules):
        raise PolicyError(
            where,
            "fingerprint",
            "does not match the rules (edited by hand? write it with `kuberank policy set`)",
        )
    return rules, version, meta["fingerprint"]


# --------------------------------------------------------------------------- the store


def read_stored(store: str) -> str | None:
    """The text of STORE/policy.json, or None when the store has no policy."""
    path = materialize_if_present(store_path(store, POLICY))  # denied or unreachable: raises
    return path.read_text() if path is not None and path.is_file() else None


def index_fields(store: str) -> dict[str, str]:
    """The attribute fields the store's index keeps (its index.json), without loading it."""
    meta = json.loads(Path(materialize(store_path(store, INDEX_DIR, META_FILE))).read_text())
    return dict(meta.get("attributes") or {})


def check_file(store: str, file: str | None = None) -> dict:
    """``kuberank policy check``: a policy file (or, without one, the store's own) checked
    against the store's index; its summary."""
    if file is None:
        text = read_stored(store)
        if text is None:
            raise KuberankError(f"{store_path(store, POLICY)}: the store has no policy")
        where = store_path(store, POLICY)
        rules, version, fp = parse_stored(text, where)
    else:
        where = file
        try:
            text = Path(file).read_text()
        except OSError as exc:
            raise KuberankError(f"{file}: {exc.strerror}") from None
        rules, _ = parse_rules(text, where)
        version, fp = None, fingerprint(rules)
    check_rules(rules, index_fields(store), where)
    return summary(rules, version, fp)


def summary(rules: PolicyRules, version: int | None, fp: str) -> dict:
    return {
        "version": version,
        "fingerprint": fp,
        "blocked_items": len(rules.blocked_items),
        "blocked_terms": len(rules.blocked_terms),
        "on_blocked_term": rules.on_blocked_term,
        "caps": dict(rules.caps),
    }


def write_policy(store: str, file: str) -> dict:
    """``kuberank policy set``: check ``file`` against the store's index and write it as
    STORE/policy.json, one version above the stored one when the rules changed (the same
    rules keep their version)."""
    out = check_file(store, file)
    rules, _ = parse_rules(Path(file).read_text(), file)
    version = 1
    old = read_stored(store)
    if old is not None:
        try:
            _, old_version, old_fp = parse_stored(old, store_path(store, POLICY))
            version = old_version if old_fp == out["fingerprint"] else old_version + 1
        except PolicyError:  # a broken stored policy is replaced; its version is lost
            version = 1
    body = {
        "format": POLICY_FORMAT,
        "version": version,
        "fingerprint": out["fingerprint"],
        **rules.model_dump(),
    }
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / POLICY
        write_json(local, body)
        publish(local, store_path(store, POLICY))
    return {**out, "version": version, "store": str(store)}


# --------------------------------------------------------------------------- served


@dataclass
class Policy:
    """A store's policy, arranged for the request path of one loaded index."""

    rules: PolicyRules
    version: int
    fingerprint: str
    rows: np.ndarray  # the index rows of the blocked items, sorted
    terms: re.Pattern | None
    groups: dict[str, list[tuple]]  # per cap attribute, each row's group values

    def info(self) -> dict:
        return {"version": self.version, "fingerprint": self.fingerprint}

    def screen(self, query: str) -> tuple[str | None, str | None]:
        """``(query to search, decision)``: the query unchanged (decision None), or with the
        blocked terms cut out ("filtered"; None to search when nothing is left). Raises
        BlockedQuery under ``reject``."""
        if self.terms is None or self.terms.search(query) is None:
            return query, None
        if self.rules.on_blocked_term == REJECT:
            raise BlockedQuery("contains a term the serving policy blocks")
        rest = " ".join(self.terms.sub(" ", query).split())
        return (rest if any(c.isalnum() for c in rest) else None), "filtered"

    def removed(
        self,
        index,
        other_exclude: np.ndarray,
        query: np.ndarray | None,
        found_scores: np.ndarray | None,
        n: int,
    ) -> int:
        """How many blocked items dense retrieval would have returned among the n candidates
        without the blocklist (rows not excluded otherwise; every one when all are ranked)."""
        own = np.setdiff1d(self.rows, other_exclude, assume_unique=True)
        if len(own) == 0 or query is None or found_scores is None:
            return int(len(own))
        return among_found(
            index.embeddings[own] @ np.asarray(query, dtype=np.float32), found_scores, n
        )

    def cap(self, cands: np.ndarray, order: np.ndarray, k: int) -> tuple[np.ndarray, int]:
        """The first k of ``order`` (positions into ``cands``) whose groups all have room
        (ceil(share * k) each); and how many of the uncapped top k it displaced."""
        limits = {name: math.ceil(share * k - 1e-9) for name, share in self.rules.caps.items()}
        counts: dict[tuple, int] = {}
        picked = []
        for pos in order:
            keys = [
                (name, value) for name in limits for value in self.groups[name][int(cands[pos])]
            ]
            if all(counts.get(key, 0) < limits[key[0]] for key in keys):
                picked.append(pos)
                for key in keys:
                    counts[key] = counts.get(key, 0) + 1
                if len(picked) == k:
                    break
        top = np.asarray(picked, dtype=np.int64)
        return top, int(len(np.setdiff1d(order[:k], top)))


def candidate_count(policy: Policy | None, k: int, candidates: int) -> int:
    """How many candidates retrieval hands to F for a top k: ``candidates`` (at least k), and
    with caps at least CAP_DEPTH * k, so the caps have items to take instead."""
    n = max(k, candidates)
    return max(n, CAP_DEPTH * k) if policy is not None and policy.rules.caps else n


def policy_decisions(removed: int, displaced: int) -> dict[tuple[str, str], int]:
    """The decisions of the request path on one request, as the counter's labels."""
    return {("blocked_items", "removed"): removed, ("caps", "displaced"): displaced}


def among_found(blocked_scores: np.ndarray, found_scores: np.ndarray, n: int) -> int:
    """How many blocked rows (their retrieval scores) would have been among the ``n``
    candidates retrieved without them (``found_scores``, best first): those scoring at least
    the n-th; all of them when fewer than n were found. Dense and lexical/hybrid retrieval
    both count policy removals this way."""
    if len(found_scores) < n:
        return int(len(blocked_scores))
    return int(np.count_nonzero(np.asarray(blocked_scores) >= found_scores[n - 1]))


def _groups(index, name: str) -> list[tuple]:
    return item_groups((getattr(index, "attributes", None) or {}).get("values", {})[name])


def arrange(rules: PolicyRules, version: int, fp: str, index, where: str) -> Policy:
    """``rules`` arranged for ``index`` (its rows and attributes); PolicyError refuses caps
    on attributes the index does not hold."""
    check_rules(rules, dict((getattr(index, "attributes", None) or {}).get("fields", {})), where)
    rows = np.unique(index.rows_of(rules.blocked_items)[0])
    terms = None
    if rules.blocked_terms:
        words = sorted({" ".join(t.split()) for t in rules.blocked_terms}, key=len, reverse=True)
        alternatives = "|".join(r"\s+".join(map(re.escape, w.split(" "))) for w in words)
        terms = re.compile(rf"(?<!\w)(?:{alternatives})(?!\w)", re.IGNORECASE)
    groups = {name: _groups(index, name) for name in rules.caps}
    return Policy(rules, version, fp, rows, terms, groups)


def load_policy(store: str, index) -> Policy | None:
    """The store's policy for ``index`` (None without one); PolicyError refuses it."""
    text = read_stored(store)
    if text is None:
        return None
    where = store_path(store, POLICY)
    return arrange(*parse_stored(text, where), index, where)


def check_policy(store: str, fields: dict[str, str]) -> None:
    """What :func:`load_policy` refuses, checked against the index's attribute ``fields``
    alone (its index.json), without the loaded index."""
    text = read_stored(store)
    if text is not None:
        where = store_path(store, POLICY)
        check_rules(parse_stored(text, where)[0], fields, where)

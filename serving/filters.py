"""Request filters: which items may be returned, applied before top-k.

A request's ``filter`` object:

- ``exclude``: item ids never to return; ``include``: the only item ids that may be returned
  (ids the index does not hold are ignored). One or the other: ``include`` already names every
  item that may be returned, so both in one filter is a contradiction (422 at
  ``filter.include``; the schema says so with ``not: {required: [include, exclude]}``),
- ``where``: predicates on item attributes kept in the index (all must hold): equality
  (``"genres": "Comedy"``: a list attribute holds the value, a scalar equals it), membership
  (``"genres": {"in": ["Comedy", "Drama"]}``) and numeric ranges (``"year": {"gte": 1990,
  "lt": 2000}``). An attribute the index does not hold, or a predicate of the wrong type for
  it (a range on a string, a string for a number): 422 naming ``filter.where.<attribute>``.

The index keeps the attributes of its items (``STORE/index/attributes.json``, written by
:func:`kuberank.components.index.attributes_of` from the dataset's attribute columns: MovieLens
``genres`` and ``year``, a BEIR corpus' other fields; their types in kuberank/item_index.py). Retrieval drops every item that does not pass (the excluded rows
widen the search, :meth:`ItemIndex.search`), so a request still gets k items whenever k pass.
"""

from __future__ import annotations

from typing import Annotated, Any

import numpy as np
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    StringConstraints,
    Tag,
    ValidationError,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from kuberank.errors import KuberankError
from kuberank.item_index import BOOLEAN, NUMBER, STRING, STRINGS

MAX_FILTER_IDS = 1000
MAX_VALUES = 100
MAX_PREDICATES = 16
RANGE_OPS = ("gte", "gt", "lte", "lt")

_Id = Annotated[str, StringConstraints(min_length=1, max_length=128)]
_Text = Annotated[StrictStr, StringConstraints(min_length=1, max_length=128)]
_Name = Annotated[str, StringConstraints(min_length=1, max_length=64)]
_Number = StrictInt | StrictFloat
Scalar = _Text | _Number | StrictBool


class Membership(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)
    in_: list[Scalar] = Field(
        alias="in", min_length=1, max_length=MAX_VALUES, description="the attribute is one of"
    )


class Range(BaseModel):
    """A numeric range; at least one bound."""

    model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra={"minProperties": 1})
    gte: _Number | None = None
    gt: _Number | None = None
    lte: _Number | None = None
    lt: _Number | None = None

    @model_validator(mode="after")
    def _a_bound(self) -> Range:
        if all(getattr(self, op) is None for op in RANGE_OPS):
            raise ValueError("a range needs at least one of gte, gt, lte, lt")
        return self


def _predicate_kind(value) -> str:
    if isinstance(value, dict):
        return "in" if "in" in value else "range"
    if isinstance(value, (Membership, Range)):
        return "in" if isinstance(value, Membership) else "range"
    return "value"


# one branch per JSON shape, so a 422 names the branch that was meant (filter.where.year.range.gte)
Predicate = Annotated[
    Annotated[Scalar, Tag("value")]
    | Annotated[Membership, Tag("in")]
    | Annotated[Range, Tag("range")],
    Discriminator(_predicate_kind),
]


class Filter(BaseModel):
    """Which items may be returned (applied before top-k); ``include`` and ``exclude`` exclude
    each other."""

    model_config = ConfigDict(
        extra="forbid", strict=True, json_schema_extra={"not": {"required": ["include", "exclude"]}}
    )
    exclude: list[_Id] = Field(
        default_factory=list,
        max_length=MAX_FILTER_IDS,
        description="item ids never returned (not with include)",
    )
    include: list[_Id] | None = Field(
        None,
        min_length=1,
        max_length=MAX_FILTER_IDS,
        description="the only item ids that may be returned (not with exclude)",
    )
    where: dict[_Name, Predicate] = Field(
        default_factory=dict,
        max_length=MAX_PREDICATES,
        description="predicates on item attributes the index holds (the served schema lists "
        'them): equality, {"in": [...]}, or a numeric range {"gte", "gt", "lte", "lt"}',
    )

    @model_validator(mode="after")
    def _not_contradictory(self) -> Filter:
        if {"include", "exclude"} <= self.model_fields_set:  # the 422 names ``include``
            problem = PydanticCustomError(
                "contradictory",
                "give include or exclude, not both: include already names every item that may "
                "be returned (ids both included and excluded contradict each other)",
            )
            raise ValidationError.from_exception_data(
                type(self).__name__,
                [InitErrorDetails(type=problem, loc=("include",), input=self.include)],
            )
        return self


class FilterError(KuberankError):
    """A filter the index cannot apply; ``field`` names it (``filter.where.year``)."""

    def __init__(self, field: str, problem: str):
        self.field, self.problem = field, problem
        super().__init__(f"{field}: {problem}")


# --------------------------------------------------------------------------- attributes


class AttributeTable:
    """An index's attributes, arranged for predicates: per string value its rows, per number
    attribute a float array (NaN where missing)."""

    def __init__(self, attributes: dict | None, count: int):
        attributes = attributes or {"fields": {}, "values": {}}
        self.fields: dict[str, str] = dict(attributes["fields"])
        self.count = count
        self.numbers: dict[str, np.ndarray] = {}
        self.postings: dict[str, dict[Any, np.ndarray]] = {}
        for name, kind in self.fields.items():
            column = attributes["values"][name]
            if kind == NUMBER:
                self.numbers[name] = np.array(
                    [np.nan if v is None else float(v) for v in column], dtype=np.float64
                )
                continue
            rows: dict[Any, list[int]] = {}
            for row, value in enumerate(column):
                for v in value if kind == STRINGS else [value]:
                    if v is not None:
                        rows.setdefault(v, []).append(row)
            self.postings[name] = {v: np.array(r, dtype=np.int64) for v, r in rows.items()}

    def check(self, flt: Filter) -> None:
        """Raise FilterError for a predicate the attributes cannot answer."""
        for name, predicate in flt.where.items():
            field = f"filter.where.{name}"
            kind = self.fields.get(name)
            if kind is None:
                held = ", ".join(sorted(self.fields)) or "none"
                raise FilterError(
                    field, f"the index holds no attribute {name!r} (it holds: {held})"
                )
            if isinstance(predicate, Range):
                if kind != NUMBER:
                    raise FilterError(field, f"a range on a {kind} attribute (numbers only)")
                continue
            values = predicate.in_ if isinstance(predicate, Membership) else [predicate]
            for value in values:
                if not _fits(kind, value):
                    raise FilterError(field, f"{value!r} is not a value of a {kind} attribute")

    def mask(self, flt: Filter) -> np.ndarray:
        """The rows whose attributes pass every ``where`` predicate (checked first)."""
        self.check(flt)
        keep = np.ones(self.count, dtype=bool)
        for name, predicate in flt.where.items():
            if isinstance(predicate, Range):
                column = self.numbers[name]
                with np.errstate(invalid="ignore"):  # NaN (missing) passes no bound
                    passing = ~np.isnan(column)
                    for op, compare in (
                        ("gte", np.greater_equal),
                        ("gt", np.greater),
                        ("lte", np.less_equal),
                        ("lt", np.less),
                    ):
                        bound = getattr(predicate, op)
                        if bound is not None:
                            passing &= compare(column, bound)
                keep &= passing
                continue
            values = predicate.in_ if isinstance(predicate, Membership) else [predicate]
            passing = np.zeros(self.count, dtype=bool)
            if name in self.numbers:
                passing |= np.isin(self.numbers[name], [float(v) for v in values])
            else:
                for value in values:
                    rows = self.postings[name].get(value)
                    if rows is not None:
                        passing[rows] = True
            keep &= passing
        return keep


def _fits(kind: str, value) -> bool:
    if kind == BOOLEAN:
        return isinstance(value, bool)
    if kind == NUMBER:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, str)


def attribute_table(index) -> AttributeTable:
    """The index's AttributeTable, made once per loaded index."""
    table = getattr(index, "_attribute_table", None)
    if table is None:
        table = AttributeTable(getattr(index, "attributes", None), len(index))
        index._attribute_table = table
    return table


def blocked_rows(index, flt: Filter | None) -> np.ndarray:
    """Index rows the filter does not let through (sorted), for retrieval to exclude."""
    if flt is None:
        return np.zeros(0, dtype=np.int64)
    keep = attribute_table(index).mask(flt) if flt.where else np.ones(len(index), dtype=bool)
    if flt.include is not None:
        allowed = np.zeros(len(index), dtype=bool)
        allowed[index.rows_of(flt.include)[0]] = True
        keep &= allowed
    if flt.exclude:
        keep[index.rows_of(flt.exclude)[0]] = False
    return np.flatnonzero(~keep)


# --------------------------------------------------------------------------- the served schema


def _predicate_schema(kind: str) -> dict:
    value = {
        STRING: {"type": "string", "minLength": 1, "maxLength": 128},
        STRINGS: {"type": "string", "minLength": 1, "maxLength": 128},
        NUMBER: {"type": "number"},
        BOOLEAN: {"type": "boolean"},
    }[kind]
    options = [
        value,
        {
            "type": "object",
            "properties": {"in": {"type": "array", "items": value, "minItems": 1, "maxItems": 100}},
            "required": ["in"],
            "additionalProperties": False,
        },
    ]
    if kind == NUMBER:
        options.append(
            {
                "type": "object",
                "properties": {op: {"type": "number"} for op in RANGE_OPS},
                "minProperties": 1,
                "additionalProperties": False,
            }
        )
    return {"anyOf": options}


def served_schema(schema: dict, fields: dict[str, str]) -> dict:
    """The OpenAPI schema of an app serving an index with attribute ``fields``: ``Filter.where``
    lists exactly those attributes, each with the predicates its type takes."""
    where = schema["components"]["schemas"]["Filter"]["properties"]["where"]
    for key in ("additionalProperties", "propertyNames"):
        where.pop(key, None)
    where["properties"] = {name: _predicate_schema(kind) for name, kind in fields.items()}
    where["additionalProperties"] = False
    return schema

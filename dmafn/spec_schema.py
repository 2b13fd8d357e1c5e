"""The spec's JSON Schema (for editors and for `dmafn validate`, which lists every problem at once).

Built from the same option lists the parser uses, so the two cannot drift; `spec.schema.json` in the repository is
this schema, written by `dmafn validate --schema` (a test keeps it current). The schema checks structure, types
and options; the parser (`dmafn.spec.parse_spec`) adds the checks across keys (a window a multiple of its
period, a grain that divides a day, a classifier needing labels).
"""
from __future__ import annotations

import datetime as dt
import json
from typing import Any

from dmafn.spec import (CONTRIBUTION_SCALES, DETECTORS, ENCODING_DISTANCE_MAX, FUSIONS, MAX_RETRIES, MISSING_INPUT,
                        MODALITY_KINDS,
                        NAIVE_TIMES, NORMALIZATIONS, PAYLOADS, PRESETS, SERIES_ENCODERS, SERIES_TRANSFORMS,
                        SMOOTHING_METHODS, TEXT_ENCODERS, THRESHOLD_METHODS, TIME_UNITS, UNREADABLE_FILES, VOTES,
                        SpecError, parse_spec)

_DURATION = {"type": "string", "pattern": r"^\s*\d+(\.\d+)?\s*(us|ms|s|sec|min|m|h|d)\s*$",
             "description": "a duration like 100ms, 1s, 5min, 2h, 1d"}
_DATE = {"type": "string", "pattern": r"^\d{4}-\d{2}-\d{2}$", "description": "a date YYYY-MM-DD"}
_COLUMNS = {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}, "minItems": 1}]}


def _enum(options: tuple[str, ...]) -> dict:
    return {"enum": list(options)}


def _number(kind: str = "number", low: float | None = None, high: float | None = None) -> dict:
    out: dict[str, Any] = {"type": kind}
    if low is not None:
        out["minimum"] = low
    if high is not None:
        out["maximum"] = high
    return out


def _closed(properties: dict, required: tuple[str, ...] = ()) -> dict:
    return {"type": "object", "properties": properties, "required": list(required), "additionalProperties": False}


_CONTEXT = {"type": "object", "properties": {"window": _DURATION, "period": _DURATION}, "required": ["window"],
            "additionalProperties": False,
            "description": "a slow view: the mean of each period (default: the grain) over the last window, "
                           "encoded as its own modality <name>_context"}
_ENCODING_DISTANCE = {**_number("number", 0, ENCODING_DISTANCE_MAX),
                      "description": "weight of the encoding's distance from the training encodings in the "
                                     "modality's error (0: off)"}
_PAYLOAD = {"payload": {**_enum(PAYLOADS), "description": "bytes: the column holds each payload; file: where each "
                                                            "lies (an s3:// URI, an absolute path, or a path under "
                                                            "payload_root)"},
            "payload_root": {"type": "string", "minLength": 1,
                             "description": "payload: file - the folder or s3:// prefix a relative file name lies in"}}
_MODALITY = {
    "tabular": ({"columns": _COLUMNS, "tolerance": _DURATION, "context": _CONTEXT,
                 "channel_dropout": _number("number", 0.0, 0.9)}, ("columns",)),
    "timeseries": ({"columns": _COLUMNS, "period": _DURATION, "window": _DURATION,
                    "encoder": _enum(SERIES_ENCODERS), "transform": _enum(SERIES_TRANSFORMS), "context": _CONTEXT,
                    "channel_dropout": _number("number", 0.0, 0.9)},
                   ("columns", "period", "window")),
    "image": ({"column": {"type": "string"}, "tolerance": _DURATION, "channels": {"enum": [1, 3]},
               "size": {"type": "array", "items": _number("integer", 8), "minItems": 2, "maxItems": 2},
               **_PAYLOAD}, ("column", "tolerance")),
    "text": ({"column": {"type": "string"}, "window": _DURATION, "encoder": _enum(TEXT_ENCODERS)},
             ("column", "window")),
    "audio": ({"column": {"type": "string"}, "tolerance": _DURATION, "clip": _DURATION,
               "sample_rate": _number("integer", 100), **_PAYLOAD}, ("column", "tolerance")),
}


_TIME_FORMAT = {"oneOf": [{"type": "string", "pattern": "%"}, {"type": "array", "minItems": 1, "items": {
    "anyOf": [{"type": "string", "pattern": "%"}, {"const": "ISO8601"}]}}]}
_MARKERS = {"oneOf": [{"type": "number"}, {"type": "array", "minItems": 1, "items": {"type": "number"}}]}


def spec_json_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of a spec file."""
    base = {"kind": _enum(MODALITY_KINDS), "path": {"type": "string"}, "encoding_distance": _ENCODING_DISTANCE,
            "time": {"type": "string", "minLength": 1, "description": "the time column's name in this modality's "
                     "files, where it is not the spec's time (read as the spec's)"},
            "entity": {**_COLUMNS, "description": "the entity columns' names in this modality's files, one for each "
                       "of the spec's entity in its order, where they are not the spec's (read as the spec's)"},
            "time_unit": {**_enum(TIME_UNITS), "description": "what this modality's time counts since the Unix "
                          "epoch where its files store it as numbers, when not the spec's time_unit"},
            "naive_times": {**_enum(NAIVE_TIMES), "description": "what this modality's times without a zone are, "
                            "when not as the spec's naive_times says"},
            "time_format": {**_TIME_FORMAT, "description": "how this modality's files write a time stored as text, "
                            "when not ISO 8601 nor as the spec's time_format says"},
            "partition": {"type": "string", "description": "where this modality's date folders lie, when not as the "
                          "spec's partition says: a key or a layout"},
            "missing_values": {"description": "tabular and timeseries: the numbers the writer stores where a value is "
                               "missing (-9999), unusable like a null - a list for every value column, or a mapping "
                               "of columns to theirs", "oneOf": [_MARKERS, {"type": "object", "minProperties": 1,
                                                                           "additionalProperties": _MARKERS}]},
            "added_columns": {"type": "array", "minItems": 1, "items": {"type": "string", "minLength": 1},
                              "description": "tabular and timeseries: value columns the table gained after some of "
                              "its files were written - a file without one reads null there (its values unusable) "
                              "instead of failing"},
            "former_names": {"type": "object", "minProperties": 1, "description": "value columns renamed upstream: "
                             "each -> the name (or names) older files stored it under; a file without the column is "
                             "read under the first of them it holds (and a version trained on an old name reads the "
                             "renamed files)", "additionalProperties": {"oneOf": [
                                 {"type": "string", "minLength": 1},
                                 {"type": "array", "minItems": 1, "items": {"type": "string", "minLength": 1}}]}}}
    modality = {"type": "object", "required": ["kind", "path"], "properties": base,
                "allOf": [{"if": {"properties": {"kind": {"const": kind}}, "required": ["kind"]},
                           "then": _closed({**base, **props}, ("kind", "path", *required))}
                          for kind, (props, required) in _MODALITY.items()]}
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "https://github.com/dmafn/dmafn/spec.schema.json",
        "title": "DMAFN pipeline spec",
        **_closed({
            "name": {"type": "string"},
            "entity": _COLUMNS,
            "time": {"type": "string"},
            "time_unit": {**_enum(TIME_UNITS), "description": "what a time column stored as numbers (integers or "
                          "floats) counts since the Unix epoch (UTC); without it a numeric time column is an error"},
            "naive_times": {**_enum(NAIVE_TIMES), "description": "what a time stored without a zone (a naive "
                            "timestamp, ISO 8601 text without an offset) is: utc (the default), or local - the wall "
                            "clock of the spec's timezone"},
            "time_format": {**_TIME_FORMAT, "description": "how a time stored as text is written where it is not ISO "
                            "8601: a strftime format as Polars reads it (%d/%m/%Y %H:%M:%S%.f; %z an offset), holding "
                            "the year, month and day; every table's and the labels', unless a modality says its own"},
            "grain": _DURATION,
            "partition": {"type": "string", "description": "where a date's files lie: a key (date: date=YYYY-MM-DD "
                          "folders) or a layout with %Y, %m and %d, a folder level per '/' (year=%Y/month=%m/day=%d)"},
            "timezone": {"type": "string", "minLength": 1},
            "lateness": {"anyOf": [_DURATION, {"const": 0}]},
            "unreadable_files": {**_enum(UNREADABLE_FILES), "description": "an input file whose bytes are no "
                                 "Parquet (truncated, empty, another format), or a row group of one whose pages do "
                                 "not decode from its bytes: fail (the default) fails its date; skip leaves it out "
                                 "of the date, named in the quarantine and runs tables (and by dmafn status)"},
            "modalities": {"type": "object", "minProperties": 1, "additionalProperties": False,
                           "patternProperties": {r"^[A-Za-z][A-Za-z0-9_]*$": modality}},
            "labels": _closed({"path": {"type": "string"}, "start": {"type": "string"}, "end": {"type": "string"}},
                              ("path",)),
            "model": _closed({"fusion": _enum(FUSIONS), "detector": _enum(DETECTORS), "preset": _enum(PRESETS),
                              "series_encoder": _enum(SERIES_ENCODERS), "text_encoder": _enum(TEXT_ENCODERS),
                              "vote": _enum(VOTES), "contribution_scale": _enum(CONTRIBUTION_SCALES),
                              "normalization": _enum(NORMALIZATIONS),
                              "modality_dropout": _number("number", 0.0, 0.9),
                              "channel_dropout": _number("number", 0.0, 0.9),
                              "cross_modal_scoring": {"type": "boolean"},
                              "cross_modal_relations": {"type": "boolean"},
                              "state_baseline": {"type": "boolean"},
                              "window_spread": {"type": "boolean"},
                              "relation_smoothing": _number("number", 0.01, 1.0),
                              "state_speed": {"oneOf": [_DURATION, {"const": False}]}}),
            "train": _closed({"start": _DATE, "end": _DATE, "epochs": _number("integer", 1),
                              "workers": _number("integer", 1), "gpu": {"type": "boolean"},
                              "batch_size": _number("integer", 1), "learning_rate": _number("number", 0.0),
                              "validation_days": _number("integer", 0), "seed": _number("integer"),
                              "exclude_labelled": {"type": "boolean"},
                              "validation_outlier_limit": _number("number", 0.0)},
                             ("start", "end")),
            "registry": {"type": "string"},
            "score": _closed({
                "output": {"type": "string"}, "quarantine": {"type": "string"}, "runs": {"type": "string"},
                "staging": {"type": "string"}, "missing_input": _enum(MISSING_INPUT),
                "threshold": _closed({"method": _enum(THRESHOLD_METHODS), "risk": _number("number", 0.0, 1.0),
                                      "quantile": _number("number", 0.0, 1.0), "value": _number("number"),
                                      "level": _number("number", 0.5, 0.9999),
                                      "rate": _number("number", 0.0, 1.0), "per_entity": {"type": "boolean"}}),
                "smoothing": _closed({"method": _enum(SMOOTHING_METHODS), "alpha": _number("number", 0.001, 1.0),
                                      "window": _number("integer", 1),
                                      "knee": _number("number", 0.0)})}, ("output",)),
            "storage": _closed({"endpoint_url": {"type": "string"}, "region": {"type": "string"},
                                "allow_http": {"type": "boolean"}, "timeout_s": _number("number", 0.1, 600),
                                "retries": {**_number("integer", 0, MAX_RETRIES), "description": "how many times a "
                                            "failed S3 request is tried again (pyarrow, boto3; deltalake for as long "
                                            "as timeout_s x (retries + 1)); default 1 - more for a busy bucket that "
                                            "throttles a large backfill"}}),
        }, ("name", "entity", "time", "grain", "modalities", "train", "registry", "score")),
    }


def spec_problems(data: Any, source: str = "<memory>") -> list[str]:
    """Every problem of a parsed spec YAML, each naming the file and the key; [] when the spec is valid.

    The schema's problems all at once; then, when the structure is sound, the parser's checks across keys."""
    import jsonschema

    plain = json.loads(json.dumps(data, default=lambda v: v.isoformat() if isinstance(v, dt.date) else str(v)))
    validator = jsonschema.Draft202012Validator(spec_json_schema())
    problems = sorted({_describe(e, source) for e in validator.iter_errors(plain)})
    if not problems:
        try:
            parse_spec(data, source)
        except SpecError as exc:
            problems.append(str(exc))
    return problems


def _describe(error, source: str) -> str:
    import jsonschema

    if error.validator in ("allOf", "if") and error.context:       # a modality's kind-specific keys
        error = jsonschema.exceptions.best_match(error.context)
    where = ".".join(str(p) for p in error.absolute_path)
    if error.validator == "additionalProperties":
        extra = sorted(set(error.instance) - set(error.schema.get("properties", {})))
        allowed = ", ".join(sorted(error.schema.get("properties", {})))
        return "; ".join(f"{source}: unknown key '{_join(where, k)}' (allowed here: {allowed})" for k in extra)
    if error.validator == "required":
        missing = error.message.split("'")[1]
        return f"{source}: missing required key '{_join(where, missing)}'"
    if error.validator == "enum":
        return f"{source}: key '{where}': {error.instance!r} is not one of {', '.join(map(str, error.validator_value))}"
    if error.validator == "pattern" and "description" in error.schema:
        return f"{source}: key '{where}': {error.instance!r} is not {error.schema['description']}"
    return f"{source}: key '{where or '(top)'}': {error.message}"


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key

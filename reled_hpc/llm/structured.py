"""JSON-schema structured output, per backend, and validation of what came back.

Servers disagree on how to ask for schema-constrained output:
- vLLM (0.8+): `response_format={"type": "json_schema", "json_schema": {...}}`. The old
  `guided_json` parameter is SILENTLY IGNORED by vLLM 0.33 (HTTP 200, unconstrained output), so
  the vLLM adapter never sends it and refuses a body that carries it.
- llama.cpp (llama_cpp.server): `response_format={"type": "json_object", "schema": ...}`; it
  rejects `json_schema`.
- none: no server support; the schema goes into the prompt and only validation guards the result.

Whatever the backend, the answer is parsed and validated here, and an invalid answer is returned as
data (`StructuredResult.errors`), never raised: the SED loop counts it against the execution rate.
"""

from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass, field
from typing import Any

from . import LLMError

Messages = list[dict[str, Any]]

# request keys that old clients use for vLLM's removed guided decoding; all are ignored by vLLM 0.33
FORBIDDEN_VLLM_KEYS = ("guided_json", "guided_regex", "guided_choice", "guided_grammar", "guided_decoding_backend")


@dataclass
class StructuredResult:
    value: Any = None  # the parsed JSON, or None when it did not parse
    errors: list[str] = field(default_factory=list)  # empty when it parsed and matched the schema

    @property
    def valid(self) -> bool:
        return not self.errors


def _schema_name(schema: dict[str, Any]) -> str:
    # OpenAI-style names: [a-zA-Z0-9_-]{1,64}
    return re.sub(r"[^A-Za-z0-9_-]", "_", str(schema.get("title") or "output"))[:64] or "output"


def _schema_instruction(schema: dict[str, Any]) -> str:
    return "Answer with one JSON value only (no prose, no code fences) that matches this JSON schema:\n" + json.dumps(
        schema, separators=(",", ":")
    )


class StructuredAdapter:
    """Adds the backend's structured-output fields to a chat-completion request body."""

    name = "base"

    def apply(self, body: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    def check(self, body: dict[str, Any]) -> None:
        """Refuse bodies this backend would misread (called on every request, schema or not)."""


class VLLMAdapter(StructuredAdapter):
    name = "vllm"

    def apply(self, body: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
        out = copy.deepcopy(body)
        out["response_format"] = {
            "type": "json_schema",
            "json_schema": {"name": _schema_name(schema), "schema": schema, "strict": True},
        }
        return out

    def check(self, body: dict[str, Any]) -> None:
        bad = sorted(_find_keys(body, FORBIDDEN_VLLM_KEYS))
        if bad:
            raise LLMError(
                f"request carries {', '.join(bad)}: vLLM >= 0.12 silently ignores guided_* parameters "
                "(HTTP 200, unconstrained output). Pass json_schema=... (sent as response_format json_schema) "
                'or extra_body={"structured_outputs": {...}} instead.'
            )


class LlamaCppAdapter(StructuredAdapter):
    name = "llama_cpp"

    def apply(self, body: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
        out = copy.deepcopy(body)
        # llama_cpp.server turns `schema` into a GBNF grammar; it rejects type json_schema
        out["response_format"] = {"type": "json_object", "schema": schema}
        return out


class PromptOnlyAdapter(StructuredAdapter):
    name = "none"

    def apply(self, body: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
        out = copy.deepcopy(body)
        msgs: Messages = out["messages"]
        note = _schema_instruction(schema)
        if msgs and msgs[0].get("role") == "system":
            msgs[0] = {**msgs[0], "content": f"{msgs[0].get('content', '')}\n\n{note}"}
        else:
            msgs.insert(0, {"role": "system", "content": note})
        return out


ADAPTERS: dict[str, type[StructuredAdapter]] = {
    "vllm": VLLMAdapter,
    "llama_cpp": LlamaCppAdapter,
    "embedded": LlamaCppAdapter,  # the embedded backend is llama_cpp.server
    "none": PromptOnlyAdapter,
}


def get_adapter(backend: str | StructuredAdapter) -> StructuredAdapter:
    if isinstance(backend, StructuredAdapter):
        return backend
    try:
        return ADAPTERS[backend]()
    except KeyError:
        raise LLMError(f"unknown structured-output backend {backend!r}; known: {', '.join(ADAPTERS)}") from None


def _find_keys(obj: Any, keys: tuple[str, ...]) -> set[str]:
    found: set[str] = set()
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k in keys:
                found.add(k)
            found |= _find_keys(v, keys)
    elif isinstance(obj, list):
        for v in obj:
            found |= _find_keys(v, keys)
    return found


# ---- parsing and validation -----------------------------------------------------------------------
_FENCE = re.compile(r"```(?:json)?\s*(.*?)```", re.DOTALL)


def extract_json(text: str) -> tuple[Any, str | None]:
    """(value, None) or (None, error). Tolerates code fences and prose around one JSON value: prompt-only
    backends and small models add them."""
    candidates = [text.strip()]
    candidates += [m.group(1).strip() for m in _FENCE.finditer(text)]
    starts = [i for i in (text.find("{"), text.find("[")) if i >= 0]
    if starts:
        candidates.append(text[min(starts) :].strip())
    err = "empty answer"
    dec = json.JSONDecoder()
    for i, cand in enumerate(candidates):
        if not cand:
            continue
        try:
            value, end = dec.raw_decode(cand)
        except json.JSONDecodeError as exc:
            err = f"not JSON: {exc.msg} at char {exc.pos}"
            continue
        if i > 0 or cand[end:].strip() == "":  # a fenced/embedded value may have prose after it
            return value, None
        err = "extra text after the JSON value"
    return None, err


_TYPES: dict[str, tuple[type, ...]] = {
    "object": (dict,),
    "array": (list,),
    "string": (str,),
    "integer": (int,),
    "number": (int, float),
    "boolean": (bool,),
    "null": (type(None),),
}


def _type_ok(value: Any, t: str) -> bool:
    if t in ("integer", "number") and isinstance(value, bool):
        return False
    if t == "integer" and isinstance(value, float):
        return value.is_integer()
    return isinstance(value, _TYPES.get(t, (object,)))


def _mini_validate(value: Any, schema: Any, path: str, errors: list[str]) -> None:
    """The subset of JSON Schema that structured-output grammars support: type, enum, const,
    properties/required/additionalProperties, items/minItems/maxItems, min/max(Length), anyOf/oneOf."""
    if not isinstance(schema, dict):
        return
    where = path or "$"
    if "anyOf" in schema or "oneOf" in schema:
        subs = schema.get("anyOf") or schema.get("oneOf") or []
        if not any(not _collect(value, s, path) for s in subs):
            errors.append(f"{where}: matches none of the alternatives")
    t = schema.get("type")
    if t is not None:
        types = t if isinstance(t, list) else [t]
        if not any(_type_ok(value, x) for x in types):
            errors.append(f"{where}: expected {'/'.join(types)}, got {type(value).__name__}")
            return
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{where}: {value!r} not one of {schema['enum']!r}")
    if "const" in schema and value != schema["const"]:
        errors.append(f"{where}: expected {schema['const']!r}")
    if isinstance(value, dict):
        props = schema.get("properties", {})
        for key in schema.get("required", []):
            if key not in value:
                errors.append(f"{where}: missing required property {key!r}")
        for key, v in value.items():
            if key in props:
                _mini_validate(v, props[key], f"{path}.{key}" if path else f"$.{key}", errors)
            elif schema.get("additionalProperties") is False:
                errors.append(f"{where}: unexpected property {key!r}")
            elif isinstance(schema.get("additionalProperties"), dict):
                _mini_validate(v, schema["additionalProperties"], f"{where}.{key}", errors)
    if isinstance(value, list):
        if "minItems" in schema and len(value) < schema["minItems"]:
            errors.append(f"{where}: fewer than {schema['minItems']} items")
        if "maxItems" in schema and len(value) > schema["maxItems"]:
            errors.append(f"{where}: more than {schema['maxItems']} items")
        if isinstance(schema.get("items"), dict):
            for i, v in enumerate(value):
                _mini_validate(v, schema["items"], f"{where}[{i}]", errors)
    if isinstance(value, str):
        if "minLength" in schema and len(value) < schema["minLength"]:
            errors.append(f"{where}: shorter than {schema['minLength']}")
        if "maxLength" in schema and len(value) > schema["maxLength"]:
            errors.append(f"{where}: longer than {schema['maxLength']}")
    if _type_ok(value, "number"):
        if "minimum" in schema and value < schema["minimum"]:
            errors.append(f"{where}: {value} < minimum {schema['minimum']}")
        if "maximum" in schema and value > schema["maximum"]:
            errors.append(f"{where}: {value} > maximum {schema['maximum']}")


def _collect(value: Any, schema: Any, path: str) -> list[str]:
    errs: list[str] = []
    _mini_validate(value, schema, path, errs)
    return errs


def validate_json(value: Any, schema: dict[str, Any]) -> list[str]:
    """Schema violations of `value` (empty list: valid). Uses the `jsonschema` package where installed
    (full drafts; vLLM nodes usually have it), else the subset validator above."""
    try:
        import jsonschema
    except ImportError:
        return _collect(value, schema, "")
    validator_cls = jsonschema.validators.validator_for(schema)
    return [
        f"{e.json_path}: {e.message}"
        for e in sorted(validator_cls(schema).iter_errors(value), key=lambda e: [str(p) for p in e.path])
    ]


def parse_structured(text: str, schema: dict[str, Any]) -> StructuredResult:
    value, err = extract_json(text)
    if err is not None:
        return StructuredResult(None, [err])
    return StructuredResult(value, validate_json(value, schema))

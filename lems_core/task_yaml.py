"""Local lm-eval task YAMLs, read as data and never as code.

lm-eval's own loader imports Python for ``!function`` tags (from next to the YAML or
from any absolute path), renders prompt fields with an unsandboxed Jinja2 environment
(so ``{{ lipsum.__globals__['os'].popen(...) }}`` runs a shell command), follows
``include:`` anywhere, and expands YAML aliases without limit. ``check_task_yaml``
reads a local task YAML and everything it includes *before* lm-eval sees it, and hands
lm-eval the validated, merged config dict instead of the path. The rules it enforces:

- each file is a regular file of at most ``MAX_YAML_BYTES`` (a FIFO, device or folder
  is refused at once, without blocking), UTF-8, nested at most ``MAX_YAML_DEPTH`` deep;
- YAML is parsed with the safe loader; anchors and aliases (``&a`` / ``*a``, so also
  ``<<`` merges) are refused, and so is every tag beyond YAML's plain ones, ``!function``
  above all;
- every string is a Jinja template of plain field access only: ``{{field}}``,
  ``{{ field.sub }}``, ``{{field[0]}}``, ``{{field['key']}}``, lists and ``~`` of those,
  and the argument-free-or-constant filters in ``SAFE_FILTERS``; no ``{% %}`` blocks,
  calls, names or attributes starting with ``_``, Jinja's globals (``lipsum``,
  ``range``, ...) or any other expression;
- the keys whose value can only be Python code (``CODE_KEYS``) are refused, and each
  ``metric_list`` metric must be one lm-eval registers itself (an unknown name, or
  ``hf_evaluate: true``, makes lm-eval load a metric script through ``evaluate.load``);
- ``include:`` names a file inside the top YAML's own folder (after resolving links),
  checked by these same rules, at most ``MAX_INCLUDED_FILES`` files in all, no cycles.

A refusal is an ``UnsafeTaskYAML``; an unreadable or malformed file a ``TaskYAMLError``.
Both are ``ValueError``s, so the CLI exits 2 and the app shows the message.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .safe_io import read_text_capped

MAX_YAML_BYTES = 1 << 20
MAX_YAML_DEPTH = 32
MAX_INCLUDED_FILES = 16
CODE_KEYS = ("class", "custom_dataset", "process_docs", "process_results")
SAFE_FILTERS = frozenset({"trim", "lower", "upper", "capitalize", "title", "string", "int", "float", "length",
                          "first", "last", "join", "replace"})
_PLAIN_TAGS = frozenset(f"tag:yaml.org,2002:{t}" for t in ("str", "int", "float", "bool", "null", "seq", "map"))
_PLAIN_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*")
# Jinja's globals, and the names it gives meaning to inside templates
_JINJA_NAMES = frozenset({"range", "dict", "lipsum", "cycler", "joiner", "namespace", "self", "loop", "caller",
                          "varargs", "kwargs", "super"})


class TaskYAMLError(ValueError):
    """A local task YAML that cannot be read as one: missing, not a regular file, too large, malformed."""


class UnsafeTaskYAML(TaskYAMLError):
    """A local task YAML that would make lm-eval run code the user did not choose (see the module's rules)."""


@dataclass
class _IncludeWalk:
    """The folder includes must stay in, and the files read so far (a bound on the whole walk)."""

    root: Path
    files: list[Path] = field(default_factory=list)


def check_task_yaml(path: str | Path) -> dict:
    """The config of the task YAML at ``path``, its includes merged in (lm-eval's order), validated.

    The result has no ``include`` key and no tags: lm-eval gets it as a dict and reads no file of it.
    """
    top = Path(path).expanduser().resolve()
    return _load(top, _IncludeWalk(top.parent))


def _load(path: Path, walk: _IncludeWalk) -> dict:
    """One file and, depth first, what it includes; its own keys win over included ones."""
    if path in walk.files:
        raise UnsafeTaskYAML(f"{path}: include cycle")
    if len(walk.files) >= MAX_INCLUDED_FILES:
        raise UnsafeTaskYAML(f"{path}: more than {MAX_INCLUDED_FILES} files through include:")
    walk.files.append(path)
    cfg = parse_task_yaml(read_text_capped(path, MAX_YAML_BYTES, TaskYAMLError, "a task YAML"), path)
    check_config(cfg, path)
    includes = cfg.pop("include", None)
    if includes is None:
        return cfg
    merged: dict = {}
    for name in includes if isinstance(includes, list) else [includes]:
        included = _load(_include_target(name, path, walk.root), walk)
        included.pop("task_list", None)  # it lists the included file's own tasks
        merged.update(included)
    return merged | cfg


def _include_target(name, path: Path, root: Path) -> Path:
    """The file an ``include:`` entry names, which must lie inside ``root``."""
    if not isinstance(name, str) or not name:
        raise UnsafeTaskYAML(f"{path}: include: entries must be file names, got {name!r}")
    target = (path.parent / name).resolve()
    if not target.is_relative_to(root):
        raise UnsafeTaskYAML(f"{path}: include: {name} lies outside the task's folder {root}; "
                             "only files inside it may be included")
    return target


def parse_task_yaml(text: str, where: Path | str) -> dict:
    """A YAML mapping parsed with the safe loader, after refusing aliases, anchors, tags and deep nesting."""
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    try:
        _check_events(yaml.parse(text, Loader=loader), where)
        cfg = yaml.load(text, Loader=loader)  # noqa: S506 (a safe loader; the events were checked above)
    except yaml.YAMLError as exc:
        raise TaskYAMLError(f"{where}: not valid YAML: {exc}") from None
    if not isinstance(cfg, dict):
        raise TaskYAMLError(f"{where}: a task YAML must be a mapping, got {type(cfg).__name__}")
    return cfg


def _check_events(events, where) -> None:
    depth = 0
    for event in events:
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise UnsafeTaskYAML(f"{where}: YAML anchors and aliases (&name, *name, <<) are not accepted in a "
                                 "task YAML (an alias can expand without limit); write the values out")
        _check_tag(getattr(event, "tag", None), where)
        if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
            depth += 1
            if depth > MAX_YAML_DEPTH:
                raise TaskYAMLError(f"{where}: nested more than {MAX_YAML_DEPTH} levels deep")
        elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
            depth -= 1


def _check_tag(tag: str | None, where) -> None:
    if tag is None or tag in _PLAIN_TAGS:
        return
    if tag == "!function":
        raise UnsafeTaskYAML(f"{where}: !function imports and runs Python code; a local task YAML may not use it "
                             "(use lm-eval's built-in tasks, or plain fields and templates)")
    raise UnsafeTaskYAML(f"{where}: the YAML tag {tag} is not accepted in a task YAML")


def check_config(cfg: dict, where: Path | str) -> None:
    """Refuse code keys, metrics lm-eval would load as scripts, and any template beyond field access."""
    for key in CODE_KEYS:
        if key in cfg:
            raise UnsafeTaskYAML(f"{where}: '{key}:' names Python code; a local task YAML may not set it")
    _check_metrics(cfg.get("metric_list"), where)
    _check_strings(cfg, where, "")


def _check_metrics(metric_list, where) -> None:
    if metric_list is None:
        return
    if not isinstance(metric_list, list) or not all(isinstance(m, dict) for m in metric_list):
        raise TaskYAMLError(f"{where}: metric_list must be a list of mappings")
    known = _registered_metrics()
    for entry in metric_list:
        if entry.get("hf_evaluate") is not None and entry.get("hf_evaluate") is not False:
            raise UnsafeTaskYAML(f"{where}: hf_evaluate loads a metric script; a local task YAML may not set it")
        if entry.get("metric") not in known:
            raise UnsafeTaskYAML(f"{where}: metric {entry.get('metric')!r} is not one lm-eval registers "
                                 f"({', '.join(sorted(known))}); lm-eval would load it as a script")


def _registered_metrics() -> frozenset[str]:
    import lm_eval.api.metrics  # noqa: F401  (registers lm-eval's metrics)
    from lm_eval.api.registry import metric_registry

    return frozenset(metric_registry.keys())


def _check_strings(value, where, key: str) -> None:
    """Every string anywhere in the config (lm-eval renders many fields) as a field-access-only template."""
    if isinstance(value, str):
        check_template(value, f"{where}: {key or 'value'}")
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_strings(v, where, f"{key}.{k}" if key else str(k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _check_strings(v, where, f"{key}[{i}]")


def check_template(text: str, where: str) -> None:
    """Refuse a Jinja template that does more than look fields up (see the module's rules)."""
    if "{" not in text:
        return
    from jinja2 import Environment, TemplateSyntaxError, nodes

    try:
        tree = Environment().parse(text)
    except TemplateSyntaxError as exc:
        raise TaskYAMLError(f"{where}: not a valid Jinja template ({exc.message})") from None
    for node in tree.body:
        if not isinstance(node, nodes.Output):
            raise UnsafeTaskYAML(f"{where}: Jinja blocks ({{% ... %}}) are not accepted in a task YAML")
        for part in node.nodes:
            if not isinstance(part, nodes.TemplateData) and not _plain_access(part):
                raise UnsafeTaskYAML(f"{where}: only plain field access ({{{{field}}}}, {{{{field.sub}}}}, "
                                     f"{{{{field[0]}}}}) is accepted in a task YAML's templates, not {text!r}")


def _plain_access(node) -> bool:
    """A field lookup, a constant, a list / concatenation of those, or one through a safe filter."""
    from jinja2 import nodes

    if isinstance(node, nodes.Name):
        return node.ctx == "load" and _plain_name(node.name) and node.name not in _JINJA_NAMES
    if isinstance(node, nodes.Getattr):
        return _plain_name(node.attr) and _plain_access(node.node)
    if isinstance(node, nodes.Getitem):
        return _constant_key(node.arg) and _plain_access(node.node)
    if isinstance(node, nodes.Const):
        return isinstance(node.value, (str, int, float)) or node.value is None
    if isinstance(node, (nodes.List, nodes.Tuple)):
        return all(_plain_access(item) for item in node.items)
    if isinstance(node, nodes.Concat):
        return all(_plain_access(item) for item in node.nodes)
    if isinstance(node, nodes.Filter):
        return _safe_filter(node)
    return False


def _safe_filter(node) -> bool:
    from jinja2 import nodes

    return (node.name in SAFE_FILTERS and node.node is not None and _plain_access(node.node)
            and all(isinstance(a, nodes.Const) for a in node.args)
            and not node.kwargs and node.dyn_args is None and node.dyn_kwargs is None)


def _constant_key(node) -> bool:
    """An index or key written in the template: an integer (maybe negative) or a string not starting with '_'."""
    from jinja2 import nodes

    if isinstance(node, nodes.Neg):
        node = node.node
        return isinstance(node, nodes.Const) and type(node.value) is int
    if not isinstance(node, nodes.Const):
        return False
    return type(node.value) is int or (isinstance(node.value, str) and not node.value.startswith("_"))


def _plain_name(name: str) -> bool:
    return bool(_PLAIN_NAME.fullmatch(name))

"""onnxruntime's execution providers as a device profile names them, and what they ran.

Entries (a name or alias, ``[name, options]``, ``{name:, options:}``) are checked and
resolved to onnxruntime's own names; a provider missing here is named with the package
to install; ``fallback_report`` says when a block silently ran on the CPU instead.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

from loom.core.errors import BackendUnavailableError, ConfigError

Provider = str | tuple[str, dict[str, Any]]

CPU_PROVIDER = "CPUExecutionProvider"

#: friendly names a device profile may use (lower case) -> onnxruntime's provider names
PROVIDER_ALIASES: dict[str, str] = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "trt": "TensorrtExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
    "ov": "OpenVINOExecutionProvider",
    "qnn": "QNNExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
    "xnnpack": "XnnpackExecutionProvider",
    "directml": "DmlExecutionProvider",
    "dml": "DmlExecutionProvider",
    "nnapi": "NnapiExecutionProvider",
    "migraphx": "MIGraphXExecutionProvider",
    "dnnl": "DnnlExecutionProvider",
    "webgpu": "WebGpuExecutionProvider",
}

#: what to install to get a provider (onnxruntime's CPU wheel has only CPU and Azure).
#: The accelerator wheels replace the plain one (they share the module name): uninstall
#: ``onnxruntime`` first.
PROVIDER_PACKAGES: dict[str, str] = {
    "CUDAExecutionProvider": "pip install onnxruntime-gpu (needs the CUDA and cuDNN libraries; "
    "on Jetson, the JetPack build of onnxruntime-gpu)",
    "TensorrtExecutionProvider": "pip install onnxruntime-gpu and the TensorRT libraries "
    "(on Jetson, JetPack ships TensorRT; use the JetPack build of onnxruntime-gpu)",
    "OpenVINOExecutionProvider": "pip install onnxruntime-openvino",
    "QNNExecutionProvider": "pip install onnxruntime-qnn (Windows on Snapdragon); on Android, "
    "the onnxruntime-android-qnn package",
    "DmlExecutionProvider": "pip install onnxruntime-directml (Windows)",
    "CoreMLExecutionProvider": "the macOS/iOS build of onnxruntime (pip install onnxruntime on a Mac)",
    "XnnpackExecutionProvider": "an onnxruntime built with --use_xnnpack (the Android and iOS "
    "packages include it)",
    "NnapiExecutionProvider": "the onnxruntime-android package (Android only)",
    "MIGraphXExecutionProvider": "pip install onnxruntime-migraphx (AMD ROCm)",
    "DnnlExecutionProvider": "an onnxruntime built with --use_dnnl",
    "WebGpuExecutionProvider": "pip install onnxruntime-webgpu",
}

#: provider options that name a folder the provider writes into; onnxruntime's TensorRT
#: provider creates only the last level of it, so they are made (parents too) before use
CACHE_FOLDER_OPTIONS: dict[str, tuple[str, ...]] = {
    "TensorrtExecutionProvider": ("trt_engine_cache_path", "trt_timing_cache_path"),
}

#: session option that makes onnxruntime keep which provider runs which node
ASSIGNMENT_KEY = "session.record_ep_graph_assignment_info"


class ProviderFallbackWarning(UserWarning):
    """A requested execution provider was dropped, or runs none of a block's nodes: CPU runs them."""

def resolve_provider_name(name: str) -> str:
    """An alias (``cuda``) or any spelling of a provider's name -> onnxruntime's name.

    Names neither an alias nor known to this onnxruntime are returned unchanged: the
    availability check names them (a newer provider may be unknown to an older build).
    """
    key = name.strip()
    alias = PROVIDER_ALIASES.get(key.lower())
    if alias:
        return alias
    known = {*PROVIDER_ALIASES.values(), *_all_providers()}
    by_lower = {k.lower(): k for k in known}
    return by_lower.get(key.lower(), key)


def provider_problems(providers: Any) -> list[str]:
    """Every malformed entry of a ``providers`` option, as ``providers[i]: why``.

    Checks the form only (no onnxruntime needed), so that a device profile of another
    machine is validated here: availability is a question for the machine that runs it.
    """
    if isinstance(providers, str):
        providers = [providers]
    if not isinstance(providers, Sequence):
        return [f"providers: expected a list of providers, got {type(providers).__name__} {providers!r}"]
    if not providers:
        return ["providers: empty; list at least one provider (e.g. cpu)"]
    problems: list[str] = []
    seen: dict[str, int] = {}
    for i, entry in enumerate(providers):
        where = f"providers[{i}]"
        name, options, problem = _split_entry(entry)
        if problem:
            problems.append(f"{where}: {problem}, got {entry!r}")
            continue
        assert name is not None and options is not None
        for key, value in options.items():
            if not isinstance(key, str) or not key:
                problems.append(f"{where}.options: option names are text, got {key!r}")
            elif value is None or not isinstance(value, (str, int, float, bool)):
                problems.append(
                    f"{where}.options.{key}: a provider option is a scalar (text, number or "
                    f"true/false), got {value!r}"
                )
        resolved = resolve_provider_name(name)
        if resolved in seen:
            problems.append(f"{where}: {resolved} is already providers[{seen[resolved]}]")
        seen.setdefault(resolved, i)
    return problems


def _split_entry(entry: Any) -> tuple[str | None, dict[str, Any] | None, str | None]:
    """(name, options, None) of one provider entry, or (None, None, why it is malformed)."""
    form = "a provider is a name, [name, {options}] or {name: ..., options: {...}}"
    if isinstance(entry, str):
        return (entry, {}, None) if entry.strip() else (None, None, "empty provider name")
    if isinstance(entry, (tuple, list)):
        if len(entry) != 2 or not isinstance(entry[0], str) or not entry[0].strip():
            return None, None, form
        if entry[1] is None:
            return entry[0], {}, None
        if not isinstance(entry[1], Mapping):
            return None, None, f"the options of [name, options] must be a mapping ({form})"
        return entry[0], dict(entry[1]), None
    if isinstance(entry, Mapping):
        unknown = sorted(str(k) for k in entry if k not in ("name", "options"))
        if unknown:
            return None, None, f"unknown key(s) {unknown}: {form}"
        name, options = entry.get("name"), entry.get("options")
        if not isinstance(name, str) or not name.strip():
            return None, None, f"'name' must be a provider name ({form})"
        if options is None:
            return name, {}, None
        if not isinstance(options, Mapping):
            return None, None, f"'options' must be a mapping ({form})"
        return name, dict(options), None
    return None, None, form


def normalize_providers(providers: Any) -> list[Provider]:
    """Entries in any accepted form -> onnxruntime's: a name, or ``(name, options)``.

    Aliases are resolved; ``ConfigError`` lists every malformed entry with its index.
    """
    problems = provider_problems(providers)
    if problems:
        raise ConfigError("onnxruntime: " + "; ".join(problems))
    if isinstance(providers, str):
        providers = [providers]
    result: list[Provider] = []
    for entry in providers:
        name, options, _ = _split_entry(entry)
        assert name is not None and options is not None
        resolved = resolve_provider_name(name)
        # a bare name stays a bare name: describe() (a fingerprint) reads as it did
        result.append((resolved, options) if options or not isinstance(entry, str) else resolved)
    return result


def check_available(
    providers: list[Provider], available: Sequence[str], *, fallback: bool
) -> tuple[list[Provider], list[str]]:
    """(providers to use, providers dropped); ``BackendUnavailableError`` when one is missing
    and ``fallback`` is off."""
    missing = [n for n in provider_names(providers) if n not in available]
    if not missing:
        return prepare_cache_folders(providers), []
    if not fallback:
        raise BackendUnavailableError(
            f"onnxruntime provider(s) {missing} not available here; this onnxruntime has "
            f"{list(available)}. {install_hint(missing)}; or set fallback: true to drop "
            f"them and run on the providers that are here"
        )
    kept = [p for p in providers if _name(p) not in missing]
    return prepare_cache_folders(kept or [CPU_PROVIDER]), missing


def prepare_cache_folders(providers: Sequence[Provider]) -> list[Provider]:
    """The providers, with each cache folder their options name made (parents too) and
    checked writable; ``~`` is expanded (onnxruntime would not).

    onnxruntime's TensorRT provider creates only the last level of
    ``trt_engine_cache_path``: a profile naming ``/var/cache/sparseloom/trt`` failed on a
    machine without ``/var/cache/sparseloom``. A folder that cannot be made or written is
    ``BackendUnavailableError`` naming the option and what to do, when the backend is
    made, not a failure at the first block's load. Only providers that will run are
    passed here, so a profile of another machine creates nothing on this one.
    """
    out: list[Provider] = []
    for p in providers:
        keys = CACHE_FOLDER_OPTIONS.get(_name(p), ())
        if isinstance(p, str) or not any(k in p[1] for k in keys):
            out.append(p)
            continue
        options = dict(p[1])
        for key in keys:
            if key in options:
                options[key] = _make_cache_folder(p[0], key, str(options[key]))
        out.append((p[0], options))
    return out


def _make_cache_folder(provider: str, key: str, value: str) -> str:
    path = Path(os.path.expanduser(value))
    try:
        path.mkdir(parents=True, exist_ok=True)
        writable = os.access(path, os.W_OK | os.X_OK)
        why = "" if writable else "it exists but this user cannot write to it"
    except OSError as exc:
        why = f"cannot be made: {type(exc).__name__}: {exc.strerror or exc}"
    if why:
        user_cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sparseloom"
        raise BackendUnavailableError(
            f"onnxruntime {provider}: {key} {value}: {why}. Make it writable for this user "
            f"(sudo install -d -o $USER {path}) or point {key} at a folder of the user's "
            f"cache, e.g. {user_cache / path.name}"
        )
    return str(path)


def install_hint(names: Sequence[str]) -> str:
    hints = []
    for n in names:
        package = PROVIDER_PACKAGES.get(n)
        if package:
            hints.append(f"for {n}: {package}")
        elif n in _all_providers():
            hints.append(f"for {n}: an onnxruntime package or build that includes it")
        else:
            known = sorted({*PROVIDER_ALIASES, *_all_providers()})
            hints.append(f"{n} is not a provider this onnxruntime knows (names and aliases: {known})")
    return "; ".join(hints)


def fallback_report(
    requested: Sequence[str],
    registered: Sequence[str],
    used: Mapping[str, int] | None,
    *,
    dropped: Sequence[str] = (),
) -> tuple[bool, str | None]:
    """Whether a requested non-CPU provider runs none of a block's nodes, and why.

    Three ways it happens: dropped for being unavailable (``fallback``), not registered
    by onnxruntime (its libraries failed to load), or registered but handed no node
    (it supports none of the block's ops, or declined the graph). With ``used``
    unknown only the first two can be seen. A block without nodes cannot fall back.
    """
    reasons: list[str] = []
    total = sum(used.values()) if used is not None else None
    for name in requested:
        if name == CPU_PROVIDER:
            continue
        if name in dropped:
            reasons.append(f"{name} is not available here (dropped)")
        elif name not in registered:
            reasons.append(f"{name} did not register (its libraries or driver failed to load)")
        elif used is not None and total and not used.get(name):
            reasons.append(f"{name} runs none of the {total} nodes")
    if not reasons:
        return False, None
    cpu = f"{used.get(CPU_PROVIDER, 0)} of {total} nodes" if used is not None and total else "the nodes"
    return True, "silent CPU fallback: " + "; ".join(reasons) + f"; {CPU_PROVIDER} runs {cpu}"


def assignment_counts(session: Any) -> dict[str, int] | None:
    """Provider -> nodes it was given, from onnxruntime's record; None when it has none."""
    get = getattr(session, "get_provider_graph_assignment_info", None)
    if get is None:
        return None
    try:
        subgraphs = get()
    except Exception:  # the record was not kept (an onnxruntime that ignores the key)
        return None
    counts: dict[str, int] = {}
    for sub in subgraphs:
        counts[sub.ep_name] = counts.get(sub.ep_name, 0) + len(sub.get_nodes())
    return counts


def _name(p: Provider) -> str:
    return p if isinstance(p, str) else p[0]


def provider_names(providers: Sequence[Provider]) -> list[str]:
    return [_name(p) for p in providers]


@lru_cache(maxsize=1)
def _all_providers() -> tuple[str, ...]:
    """Every provider name this onnxruntime knows of (built in or not); empty without it."""
    try:
        import onnxruntime

        return tuple(onnxruntime.get_all_providers())
    except ImportError:
        return ()

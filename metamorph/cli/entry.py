"""One wrapper for every entry point: help, version, strict keys, clean errors.

``@entry_point("metamorph-sample", "sample")`` replaces ``@hydra.main(...)`` on a CLI's main and,
around Hydra:

- ``--help`` / ``-h`` print what the tool does (its module docstring), its options with the
  comments of its primary config, the groups it uses and a working example (Hydra's own help
  shows the composed config without comments and every group of the package; it stays under
  ``--hydra-help``); ``--version`` prints metamorph's version;
- unknown keys, with or without ``+``, fail before anything runs, naming the closest valid key
  (:func:`metamorph.config.strict.check_overrides`);
- a required option left unset, or an error that is the user's input (``ValueError`` and the
  file errors), prints one line ``<tool>: error: <problem and fix>`` and exits with status 2;
  the run folder Hydra created for this run is removed when it holds only Hydra's own files
  (``.hydra/``, the log), so a failed run leaves nothing behind (a failed training keeps its
  checkpoints). ``METAMORPH_DEBUG=1`` re-raises instead, with the traceback;
- with ``tee_log``, what the tool prints also goes to the run's log file, which would otherwise
  stay empty (the tools print, they do not log).
"""

from __future__ import annotations

import functools
import io
import logging
import os
import re
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from metamorph.config.experiments import renamed_hint
from metamorph.config.locations import CONF_DIR
from metamorph.config.strict import UnknownKeyError, check_overrides

USER_ERRORS = (
    ValueError,
    FileNotFoundError,
    PermissionError,
    NotADirectoryError,
    IsADirectoryError,
    MissingMandatoryValue,
)
HYDRA_BOOKKEEPING = (".hydra",)


def version_text() -> str:
    import hydra as _hydra
    import torch

    import metamorph

    return (
        f"metamorph {metamorph.__version__} (torch {torch.__version__}, hydra-core "
        f"{_hydra.__version__}, python {sys.version.split()[0]})"
    )


# ----------------------------------------------------------------------------------------------
# --help from the primary config's own text
# ----------------------------------------------------------------------------------------------


def _split_primary(text: str) -> tuple[list[str], list[str], list[str]]:
    """(header comment lines, defaults-list entries, option lines) of a primary config file;
    the ``defaults`` and ``hydra`` blocks are not options."""
    header, defaults, options = [], [], []
    lines = text.splitlines()
    i = 0
    while i < len(lines) and lines[i].startswith("#"):
        header.append(lines[i][1:].rstrip()[1:] if lines[i].startswith("# ") else lines[i][1:])
        i += 1
    block = None
    for line in lines[i:]:
        top = re.match(r"^([A-Za-z_][\w]*):", line)
        if top:
            block = top.group(1)
        if block == "defaults":
            m = re.match(r"^\s*-\s*(.*?)\s*(#.*)?$", line)
            if m and m.group(1):
                defaults.append(m.group(1))
            continue
        if block == "hydra" or block == "name":
            continue
        if line.strip():
            options.append(line.rstrip())
    return header, defaults, options


def _group_options(group: str) -> list[str]:
    folder = Path(CONF_DIR, group)
    return sorted(str(p.relative_to(folder).with_suffix("")) for p in folder.rglob("*.yaml"))


def unknown_choice(overrides: list[str]) -> str | None:
    """The message for an override that picks a config-group option that does not exist (``None``
    when every choice exists): Hydra's own says only "Could not find", not what to write."""
    import difflib

    if any(o.lstrip("+~").startswith("hydra.searchpath") for o in overrides):
        return None  # options may come from another config folder: Hydra decides
    for o in overrides:
        key, sep, value = o.lstrip("+~").partition("=")
        if not sep or "." in key or value in ("", "null") or not Path(CONF_DIR, key).is_dir():
            continue
        options = _group_options(key)
        if value in options or value.startswith("["):
            continue
        close = difflib.get_close_matches(value, options, n=3, cutoff=0.5)
        near = f"did you mean {' or '.join(f'`{c}`' for c in close)}? " if close else ""
        listing = ", ".join(options) if len(options) <= 12 else f"{len(options)} options"
        return (
            f"{key}={value}: no such option in the '{key}' group; {near}"
            f"valid: {listing} (all of them: --help)"
        )
    return None


def _groups(defaults: list[str]) -> list[tuple[str, str, list[str]]]:
    """(group, default choice, options) of the groups a primary config selects."""
    out = []
    for entry in defaults:
        if entry == "_self_" or entry.startswith("override "):
            continue
        m = re.match(r"^([\w/]+)\s*:\s*(\S+)$", entry)
        if not m or m.group(1) in ("hydra", "paths"):
            continue
        group = m.group(1)
        out.append((group, m.group(2), _group_options(group)))
    return out


def help_text(prog: str, config_name: str, doc: str | None) -> str:
    header, defaults, options = _split_primary(Path(CONF_DIR, f"{config_name}.yaml").read_text())
    about = (doc or "").strip()
    parts = [f"{prog}: {about}" if about else prog, ""]
    parts += [
        f"Usage: {prog} [key=value ...]   (Hydra overrides; an unknown key is refused, naming the "
        "closest valid one)",
        "",
    ]
    examples = [h for h in header if h.strip()]
    if examples:
        parts += ["From its config:", *(f"  {h}" for h in examples), ""]
    parts += [f"Options (metamorph/conf/{config_name}.yaml; ??? = required):", *options, ""]
    groups = _groups(defaults)
    if groups:
        parts.append("Config groups (group=option; group.key=value sets one of its keys):")
        for group, default, opts in groups:
            if len(opts) <= 12:
                shown = ", ".join(opts)
            else:  # by folder: e.g. 38 experiments as finetune/ (2), neumeta/ (8), ...
                folders: dict[str, int] = {}
                for o in opts:
                    top = o.split("/")[0] + ("/" if "/" in o else "")
                    folders[top] = folders.get(top, 0) + 1
                shown = ", ".join(f"{k} ({v})" for k, v in folders.items())
                shown += f"; list them: ls metamorph/conf/{group}"
            n = f"{len(opts)} option{'s' if len(opts) != 1 else ''}"
            parts.append(f"  {group} (default {default}): {shown}  [{n}]")
        parts.append("")
    parts += [
        "Also: --version; --cfg job prints the composed config; --hydra-help shows Hydra's flags.",
    ]
    return "\n".join(parts)


def _option_comment(config_name: str, key: str) -> str:
    """The trailing comment of ``key:`` in the primary config (the option's documentation)."""
    try:
        text = Path(CONF_DIR, f"{config_name}.yaml").read_text()
    except OSError:
        return ""
    m = re.search(rf"^{re.escape(key)}:[^#\n]*#\s*(.*)$", text, flags=re.M)
    return m.group(1).strip() if m else ""


# ----------------------------------------------------------------------------------------------
# Run folders and logs
# ----------------------------------------------------------------------------------------------


def _run_dir() -> Path | None:
    """The output folder Hydra created for this run (None for tools that run in place)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        out = Path(HydraConfig.get().runtime.output_dir)
    except Exception:  # noqa: BLE001 - not under a Hydra app (tests call the function)
        return None
    return None if out.resolve() == Path.cwd().resolve() else out


def remove_if_bookkeeping(folder: Path | None) -> bool:
    """Delete ``folder`` if it holds nothing but Hydra's files (``.hydra/``, ``*.log``)."""
    if folder is None or not folder.is_dir():
        return False
    for p in folder.iterdir():
        if p.name in HYDRA_BOOKKEEPING or (p.is_file() and p.suffix == ".log"):
            continue
        return False
    shutil.rmtree(folder, ignore_errors=True)
    return True


class _Tee(io.TextIOBase):
    """Write to the console and to a log file."""

    def __init__(self, console, log_path: Path) -> None:
        self.console = console
        self.log = open(log_path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()

    def write(self, s: str) -> int:
        self.console.write(s)
        self.log.write(s)
        return len(s)

    def flush(self) -> None:
        self.console.flush()
        self.log.flush()

    def isatty(self) -> bool:
        return self.console.isatty()

    def close(self) -> None:
        self.log.close()


def _log_file() -> Path | None:
    for h in logging.getLogger().handlers:
        if isinstance(h, logging.FileHandler):
            return Path(h.baseFilename)
    return None


# ----------------------------------------------------------------------------------------------
# The decorator
# ----------------------------------------------------------------------------------------------


def _print_piped(text: str) -> None:
    """Print to stdout; a reader that closes the pipe early (``--help | head``) ends it quietly."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        # the interpreter's final flush would raise again: point stdout at /dev/null first
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        sys.exit(0)


def _fail(prog: str, message: str, run_dir: Path | None) -> None:
    remove_if_bookkeeping(run_dir)
    print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


def _guarded(
    prog: str, config_name: str, fn: Callable, tee_log: bool, errors: tuple = USER_ERRORS
) -> Callable:
    @functools.wraps(fn)
    def task(cfg: DictConfig):
        run_dir = _run_dir()
        missing = sorted(OmegaConf.missing_keys(cfg))
        if missing:
            what = "; ".join(
                f"{k}= ({_option_comment(config_name, k) or 'see --help'})" for k in missing
            )
            _fail(prog, f"missing required option {what}. Example: {prog} --help", run_dir)
        log_path = _log_file() if tee_log and run_dir is not None else None
        tee = _Tee(sys.stdout, log_path) if log_path is not None else None
        console = sys.stdout
        if tee is not None:
            sys.stdout = tee
        try:
            return fn(cfg)
        except errors as e:
            if os.environ.get("METAMORPH_DEBUG"):
                raise
            if tee is not None:
                sys.stdout, tee = console, tee.close()
            _fail(prog, str(e), run_dir)
        finally:
            if tee is not None:
                sys.stdout = console
                tee.close()

    return task


def entry_point(
    prog: str,
    config_name: str,
    doc: str | None = None,
    tee_log: bool = False,
    extra_errors: tuple = (),
) -> Callable[[Callable], Callable]:
    """Decorate ``main(cfg)`` of an entry point (instead of ``hydra.main``); ``doc`` is the
    one-paragraph description ``--help`` prints (default: the module docstring's first one);
    ``extra_errors``: more exception types that are the user's to fix (e.g. a missing extra)."""

    def deco(fn: Callable) -> Callable:
        hydra_main = hydra.main(version_base="1.3", config_path=CONF_DIR, config_name=config_name)(
            _guarded(prog, config_name, fn, tee_log, USER_ERRORS + tuple(extra_errors))
        )
        about = doc
        if about is None:
            module_doc = sys.modules[fn.__module__].__doc__ or ""
            about = module_doc.strip().split("\n\n")[0].replace("\n", " ")
            about = re.sub(r"^``[\w-]+``:\s*", "", about).replace("``", "")

        @functools.wraps(fn)
        def main():
            argv = sys.argv[1:]
            if "--version" in argv:
                _print_piped(version_text())
                return None
            if "--help" in argv or "-h" in argv:
                _print_piped(help_text(prog, config_name, about))
                return None
            from hydra._internal.utils import get_args_parser

            try:
                args, _ = get_args_parser().parse_known_args(argv)
            except SystemExit:  # Hydra reports a bad flag itself
                args = None
            if args is not None and not (
                args.config_name or args.config_path or args.config_dir or args.experimental_rerun
            ):
                hint = renamed_hint(args.overrides) or unknown_choice(args.overrides)
                if hint:
                    print(f"{prog}: error: {hint}", file=sys.stderr, flush=True)
                    sys.exit(2)
                try:
                    check_overrides(CONF_DIR, config_name, args.overrides)
                except UnknownKeyError as e:
                    print(f"{prog}: error: {e}", file=sys.stderr, flush=True)
                    sys.exit(2)
            return hydra_main()

        main.task = fn  # the undecorated function, for tests
        return main

    return deco

"""The one command-line style of every command and tool.

Every command (``python -m progsr_jax.main|distill|evaluate|evaluate_landmarks|infer|bench``
and ``tools/*.py``) is written the same way::

    def define(fv):                       # its flags, absl style: --name=value
        flags.DEFINE_string("output", None, "...", flag_values=fv)

    def main(argv=None) -> int:           # argv as sys.argv: program name first
        fv = cli.parse(argv, define, __doc__)   # config="configs/x.py" adds --config
        ...                               # raise UserError for anything the user can fix
        return 0

    if __name__ == "__main__":
        cli.run(main)

:func:`parse` reads the flags into a private ``FlagValues`` (no global state,
so tests call ``main([...])`` in-process), prints the module docstring and the
flags for ``--help``, and turns a bad flag, a bad ``--config`` file or an
unexpected argument into a :class:`UserError`.  :func:`run` prints a
``UserError`` as one ``error: ...`` line with exit status 2 (see
:func:`progsr_jax.errors.run_cli`).
"""

from __future__ import annotations

import difflib
import logging
import os
import sys
from typing import Callable, Sequence

from absl import flags
from absl import logging as absl_logging
from ml_collections import config_flags

from progsr_jax.errors import UserError, run_cli
from progsr_jax.training import config as config_files

HELP_FLAGS = ("-h", "--help", "-help", "--helpshort", "--helpfull")


def parse(argv: Sequence[str] | None, define: Callable[[flags.FlagValues], None],
          doc: str, config: str | None = None) -> flags.FlagValues:
    """Parses ``argv`` (``sys.argv`` when None) with the flags ``define`` declares.

    ``config``: the command takes ``--config=FILE[:variant]`` (``config`` is an
    example shown in its help) and every ``--config.<field>=value`` override
    (ml_collections' ``config_flags``).  ``--help`` prints ``doc`` and the
    flags and exits 0; a positional argument is a UserError.
    """
    fv, args = _parse(argv, define, doc, config)
    if args:
        raise UserError(f"unexpected argument(s): {' '.join(args)} (flags are --name=value)")
    return fv


def parse_command(argv: Sequence[str] | None, define: Callable[[flags.FlagValues], None],
                  doc: str, commands: Sequence[str]) -> tuple[str, flags.FlagValues]:
    """Like :func:`parse` for a tool whose first argument names a sub-command."""
    fv, args = _parse(argv, define, doc, None)
    if not args or args[0] not in commands:
        got = f" {args[0]!r}" if args else ""
        raise UserError(f"unknown or missing command{got}; use one of: {', '.join(commands)}")
    if len(args) > 1:
        raise UserError(f"unexpected argument(s): {' '.join(args[1:])} (flags are --name=value)")
    return args[0], fv


def _parse(argv, define, doc, config) -> tuple[flags.FlagValues, list[str]]:
    argv = list(sys.argv if argv is None else argv)
    fv = flags.FlagValues()
    define(fv)
    if config:
        argv = _resolve_recipe(argv)

        config_flags.DEFINE_config_file("config", None, f"configuration file, e.g. {config}",
                                        flag_values=fv, lock_config=True, sys_argv=argv)
    if any(a in HELP_FLAGS for a in argv[1:]):
        print((doc or "").strip())
        print()
        print(fv.get_help(include_special_flags=False))
        sys.exit(0)
    try:
        rest = fv(argv)
    except flags.Error as e:
        raise UserError(str(e).splitlines()[0]) from None
    except Exception as e:  # noqa: BLE001 - config files: missing, bad variant, bad override
        if config:
            _check_override_keys(argv)
        raise UserError(f"could not load the configuration: {str(e).splitlines()[0]}") from None
    if config:
        _check_config(fv, config)
    return fv, list(rest[1:])


def _resolve_recipe(argv: list[str]) -> list[str]:
    """``--config=configs/step3.py[:variant]`` that is not on disk -> the installed recipe
    (:func:`progsr_jax.training.config.resolve`); other arguments unchanged."""
    out = list(argv)
    for i, arg in enumerate(out):
        if arg.startswith("--config="):
            out[i] = "--config=" + config_files.resolve(arg[len("--config="):])
        elif arg == "--config" and i + 1 < len(out):
            out[i + 1] = config_files.resolve(out[i + 1])
    return out


def _flat_keys(node, prefix: str = "") -> list[str]:
    """The dotted names of a ConfigDict's values (the fields of inner dicts, recursively)."""
    keys = []
    for k in node.keys():
        value = node[k]
        if hasattr(value, "keys") and callable(value.keys):
            keys += _flat_keys(value, prefix + k + ".")
        else:
            keys.append(prefix + k)
    return keys


def _check_override_keys(argv: Sequence[str]) -> None:
    """A ``--config.<key>=...`` naming no field of the config file -> a UserError that
    names it and the nearest valid key; returns when every key exists (or the file
    cannot be read: the caller reports that)."""
    spec = next((a[len("--config="):] for a in argv if a.startswith("--config=")), None)
    if spec is None:
        return
    try:
        cfg = config_files.load(spec)
    except Exception:  # noqa: BLE001 - a config that does not load is reported by the caller
        return
    keys = _flat_keys(cfg)
    for arg in argv:
        if not arg.startswith("--config."):
            continue
        key = arg[len("--config."):].split("=", 1)[0]
        parts = key.split(".")
        node, known = cfg, []
        for part in parts:
            if not (hasattr(node, "keys") and callable(node.keys)):
                raise UserError(f"unknown config key --config.{key}: "
                                f"{'.'.join(known)} is a value, not a group of fields")
            if part not in node.keys():
                prefix = "".join(k + "." for k in known)
                near = [prefix + m for m in difflib.get_close_matches(part, list(node.keys()), 1)]
                near = near or difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
                if not near:  # the right name in another group: --config.lr -> optim.lr
                    by_name = {k.rsplit(".", 1)[-1]: k for k in reversed(keys)}
                    near = [by_name[m] for m in difflib.get_close_matches(part, list(by_name), 1)]
                hint = (f"; did you mean --config.{near[0]}?" if near else
                        f"; the fields{' of ' + prefix[:-1] if prefix else ''} are "
                        f"{', '.join(sorted(node.keys()))}")
                raise UserError(f"unknown config key --config.{key} (no field "
                                f"{part!r} in {spec}){hint}")
            node = node[part]
            known.append(part)


def _check_config(fv: flags.FlagValues, example: str) -> None:
    """``--config`` given and loaded (config_flags defers a load error to first use)."""
    if fv.config is None:
        raise UserError(f"--config is required, e.g. --config={example}")
    try:
        fv.config.keys()
    except OSError as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        raise UserError(f"could not load the configuration {fv['config'].config_filename}: "
                        f"{lines[-1]}") from None


def require(fv: flags.FlagValues, *names: str) -> None:
    """A UserError naming the first of ``names`` that was not given."""
    for name in names:
        if fv[name].value in (None, ""):
            raise UserError(f"--{name} is required (see --help)")


def named_checkpoints(values: Sequence[str], reserved: Sequence[str] = ()) -> list[tuple[str, str]]:
    """Repeated ``--checkpoint=NAME=PATH`` (or ``PATH``) flags -> ``[(name, path)]``.

    A missing flag, an empty name or path, a path that does not exist, a name
    given twice or one of ``reserved`` (a baseline's) is a one-line UserError.
    """
    if not values:
        raise UserError("--checkpoint=NAME=PATH is required (repeat it for several models)")
    out = []
    for value in values:
        name, sep, path = value.partition("=")
        if not sep:
            name, path = os.path.basename(os.path.normpath(value)), value
        if not name or not path:
            raise UserError(f"--checkpoint={value}: expected NAME=PATH")
        if name in reserved:
            raise UserError(f"--checkpoint={value}: the name {name!r} is the baseline's")
        if not os.path.exists(path):
            raise UserError(f"--checkpoint={value}: {path} does not exist")
        if name in [n for n, _ in out]:
            raise UserError(f"--checkpoint: the name {name!r} is given twice")
        out.append((name, path))
    return out


def quiet_libraries() -> None:
    """Keeps Orbax's and absl's INFO lines off the console."""
    absl_logging.set_verbosity(absl_logging.WARNING)
    logging.getLogger("absl").setLevel(logging.WARNING)


def run(main: Callable[[], int | None]) -> None:
    """Runs a command's ``main()`` and exits: a UserError is one line, exit status 2."""
    quiet_libraries()
    run_cli(main)

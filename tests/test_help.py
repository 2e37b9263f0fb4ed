"""Every command's --help: each option has a help text, and no help text shows code constants
(``DEFAULT_BETA``), module paths or issue numbers. The parsers are taken in-process from each
command's ``main`` (parse_args is stopped before anything runs)."""

import argparse
import glob
import importlib.util
import os
import re
from unittest import mock


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _Parsed(Exception):
    def __init__(self, parser):
        self.parser = parser


def _parser_of(main, argv) -> argparse.ArgumentParser:
    """The parser ``main(argv)`` builds: its parse_args raises before the command runs."""
    def stop(parser, *a, **k):
        raise _Parsed(parser)

    with mock.patch.object(argparse.ArgumentParser, "parse_args", stop):
        try:
            main(argv)
        except _Parsed as p:
            return p.parser
    raise AssertionError(f"{main} never parsed its arguments")


def _script(path: str):
    spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3],
                                                  os.path.join(REPO, path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _commands() -> dict:
    """name -> parser, sub-commands flattened (``megasimpo train``, ``convert_hf export``)."""
    from megasimpo import cli
    from megasimpo.data import stamp

    tops = {"megasimpo": _parser_of(cli.main, []),
            "convert_hf": _parser_of(_script("tools/convert_hf.py").main, []),
            "preprocess_data": _parser_of(_script("tools/preprocess_data.py").main, []),
            "review_run": _parser_of(_script("tools/review_run.py").main, []),
            "stamp": _parser_of(stamp.main, [])}
    out = {}
    for name, parser in tops.items():
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        out[name] = parser
        for sub in subs:
            for sub_name, sub_parser in sub.choices.items():
                out[f"{name} {sub_name}"] = sub_parser
    return out


def _constants() -> set:
    """Module-level ALL_CAPS names of the code (a help text must not show them)."""
    names = set()
    for path in glob.glob(os.path.join(REPO, "megasimpo", "**", "*.py"), recursive=True) + \
            glob.glob(os.path.join(REPO, "tools", "*.py")):
        with open(path) as f:
            names |= set(re.findall(r"^([A-Z][A-Z0-9]*(?:_[A-Z0-9]+)+)\s*[:=]", f.read(), re.M))
    return names


def test_every_option_of_every_command_has_a_user_facing_help():
    commands = _commands()
    assert {"megasimpo train", "megasimpo score", "megasimpo plan", "megasimpo demo",
            "convert_hf import", "convert_hf export", "preprocess_data", "review_run",
            "stamp"} <= set(commands)
    constants, problems = _constants(), []
    assert "DEFAULT_BETA" in constants  # the scan sees the code's constants
    for name, parser in commands.items():
        texts = [("description", parser.description or "")]
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            flag = "/".join(action.option_strings) or action.dest
            if not action.help or action.help == argparse.SUPPRESS:
                problems.append(f"{name} {flag}: no help")
            texts.append((flag, action.help or ""))
        for where, text in texts:
            for bad in (re.findall(r"#\d+", text)
                        + [w for w in re.findall(r"\b[A-Z][A-Z0-9]*(?:_[A-Z0-9]+)+\b", text)
                           if w.startswith("DEFAULT_") or w in constants]
                        + re.findall(r"megasimpo/[\w/]+\.py", text)):
                problems.append(f"{name} {where}: {bad!r} in {text!r}")
    assert not problems, "\n".join(problems)


def test_install_docs_and_gpu_scripts_name_no_path_outside_the_repository(tmp_path):
    # Prebuilt TE wheels come from the directory MEGASIMPO_TE_WHEELS names, not ../shared/.
    import subprocess

    files = glob.glob(os.path.join(REPO, "docs", "*.md")) + [os.path.join(REPO, "README.md")] \
        + glob.glob(os.path.join(REPO, "bench", "gpu", "*"))
    assert not [f for f in files if "../shared" in open(f).read()]
    perf = open(os.path.join(REPO, "docs", "performance.md")).read()
    assert 'pip install -e ".[te]"' in perf and "NGC" in perf and "MEGASIMPO_TE_WHEELS" in perf
    fetch = os.path.join(REPO, "bench", "gpu", "fetch.sh")  # bash: a subprocess; stops at the check
    env = {k: v for k, v in os.environ.items() if k not in ("MEGASIMPO_TE_WHEELS", "SHARED_WHEELS")}
    p = subprocess.run(["bash", fetch], capture_output=True, text=True, env=env, timeout=60)
    assert p.returncode == 1 and "set MEGASIMPO_TE_WHEELS to the directory holding" in p.stderr
    p = subprocess.run(["bash", fetch], capture_output=True, text=True, timeout=60,
                       env=dict(env, MEGASIMPO_TE_WHEELS=str(tmp_path)))
    assert p.returncode == 1 and f"{tmp_path}/transformer_engine_cu13" in p.stderr

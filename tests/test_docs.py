"""Every command and snippet in README.md and docs/*.md runs (issue 8: "every command in the docs is
run by a test"). The convention is in docs/README.md ("How the docs are tested"); in short:

- ```bash / ```sh / ```console (its `$ ` lines) blocks run with `bash -e -o pipefail`, and ```python
  blocks run in one Python session per page, in page order. ```text (output, listings, synopses) is
  not run; ```yaml is parsed and, when it is a config fragment, checked against the config schema.
  A fence without a language, or with another one, fails the page's markup test.
- An HTML comment directly above a block adjusts how it runs: `<!-- doc-test: reduced ... -->`
  (run this instead: a smaller form of a slow command), `sub OLD => NEW`, `setup ...`, `env`,
  `expect`, `server`, `needs`, `provides`, `timeout`. Nothing is skipped: a runnable block always
  runs, as is or in its declared reduced form.
- Before a shell block runs, every `--flag` of its project commands (as written, not reduced) must
  appear in that program's `--help`, and their `dotted.key=value` overrides must load with
  `load_config`. Inline command spans (`python ...`, `pip ...`, `curl ...`) must be part of some
  tested block.

Blocks run from a copy of the working tree in a temp directory (so `runs/` and any file a command
writes stay there), on the CPU, with a JAX compilation cache shared by all of them. One tiny training
run (the block marked `provides tiny-run`) is shared by every block that reads `runs/tiny`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import importlib.util
import inspect
import io
import json
import os
import queue
import re
import runpy
import shlex
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from concurrent.futures import Future
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = ["README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))]

SHELL_LANGS = {"bash", "sh", "console"}
RUN_LANGS = SHELL_LANGS | {"python"}
CHECKED_LANGS = {"yaml"}
INERT_LANGS = {"text", "json"}
DIRECTIVES = {"reduced", "setup", "sub", "env", "expect", "server", "needs", "provides", "timeout"}
BODY_DIRECTIVES = {"reduced", "setup"}
# Fixtures a block may need. Doc blocks provide tiny-run and mopd-demo (`provides`); this file makes
# the others. A block needs one when its runnable text mentions the trigger.
FIXTURES = {
    "tiny-run": re.compile(r"runs/tiny(?![\w-])"),
    "mopd-demo": re.compile(r"runs/mopd_demo(?![\w-])"),
    "hf-dir": re.compile(r"\{hf_dir\}"),
    "server": re.compile(r"\{port\}"),
}
DOC_PROVIDED = {"tiny-run", "mopd-demo"}
FIXTURE_DEPS = {"hf-dir": ("tiny-run",), "server": ("tiny-run",)}
# An inline code span that is a command: it must also be part of a tested fenced block.
INLINE_COMMAND = re.compile(r"^(python3?|pip3?|curl|bash|sh)\s")
OVERRIDE = re.compile(r"^[a-z_]+(\.[a-z_]+)+=")
DEFAULT_TIMEOUT = 600
READY = "ready in"  # serve.py's line once it listens


# ---------------------------------------------------------------------------------------------
# Parsing the markdown


@dataclasses.dataclass
class Block:
    file: str
    line: int  # the opening fence
    lang: str
    text: str
    directives: list[tuple[str, str]]

    @property
    def id(self) -> str:
        return f"{self.file}:{self.line}"

    def get(self, name: str) -> list[str]:
        return [arg for n, arg in self.directives if n == name]

    def one(self, name: str) -> str | None:
        values = self.get(name)
        return values[-1] if values else None


@dataclasses.dataclass
class Page:
    file: str
    blocks: list[Block]
    inline: list[tuple[int, str]]
    errors: list[str]


def _parse_directives(content: str, where: str, errors: list[str]) -> list[tuple[str, str]]:
    """`name [arg]` items separated by `;` on the first line; `reduced` and `setup` take the rest of
    the comment (the rest of the line and the lines below) as their argument."""
    header, _, body = content.partition("\n")
    body = textwrap.dedent(body).strip("\n")
    out, rest = [], header.strip()
    while rest:
        m = re.match(r"([A-Za-z][\w-]*)\s*:?\s*", rest)
        if not m or m.group(1) not in DIRECTIVES:
            errors.append(f"{where}: unknown doc-test directive {rest.split()[0]!r} "
                          f"(known: {', '.join(sorted(DIRECTIVES))})")
            return out
        name, rest = m.group(1), rest[m.end():]
        if name in BODY_DIRECTIVES:
            arg = "\n".join(x for x in (rest.strip(), body) if x)
            body = ""
            if not arg:
                errors.append(f"{where}: `{name}` has nothing to run")
            out.append((name, arg))
            break
        arg, _, rest = rest.partition(";")
        out.append((name, arg.strip()))
        rest = rest.strip()
    if body:
        errors.append(f"{where}: lines below the first only belong to `reduced` or `setup`")
    return out


def parse_page(file: str) -> Page:
    lines = (ROOT / file).read_text(encoding="utf-8").splitlines()
    blocks, inline, errors = [], [], []
    pending: list[tuple[str, str]] = []
    pending_line = None
    i = 0
    while i < len(lines):
        stripped = lines[i].strip()
        if stripped.startswith("<!-- doc-test:"):
            start = i
            text = stripped[len("<!-- doc-test:"):]
            while "-->" not in text and i + 1 < len(lines):
                i += 1
                text += "\n" + lines[i]
            content, found, after = text.partition("-->")
            if not found or after.strip():
                errors.append(f"{file}:{start + 1}: a doc-test marker must end with `-->` at the end of a line")
            pending += _parse_directives(content, f"{file}:{start + 1}", errors)
            pending_line = pending_line or start + 1
            i += 1
            continue
        fence = re.match(r"^(`{3,}|~{3,})(.*)$", stripped)
        if fence:
            ticks, info = fence.group(1), fence.group(2).strip()
            lang = info.split()[0].lower() if info else ""
            body, j = [], i + 1
            while j < len(lines) and lines[j].strip() != ticks:
                body.append(lines[j])
                j += 1
            block = Block(file, i + 1, lang, textwrap.dedent("\n".join(body)) + "\n", pending)
            pending, pending_line = [], None
            if not lang:
                errors.append(f"{block.id}: a fence needs a language: bash/sh/console or python (run), text (not "
                              "run: output, listings, synopses), yaml or json")
            elif lang not in RUN_LANGS | CHECKED_LANGS | INERT_LANGS:
                errors.append(f"{block.id}: unknown fence language {lang!r} (use one of "
                              f"{', '.join(sorted(RUN_LANGS | CHECKED_LANGS | INERT_LANGS))})")
            elif block.directives and lang not in RUN_LANGS:
                errors.append(f"{block.id}: doc-test markers only apply to runnable blocks, not {lang!r}")
            blocks.append(block)
            i = j + 1
            continue
        if pending:
            errors.append(f"{file}:{pending_line}: a doc-test marker must be directly above a code block "
                          "(no blank line between)")
            pending, pending_line = [], None
        for span in re.findall(r"(?<!`)`([^`\n]+)`(?!`)", lines[i]):
            if INLINE_COMMAND.match(span):
                inline.append((i + 1, span))
            errors += [f"{file}:{i + 1}: `{span}`: {e}" for e in _config_key_errors(span)]
        i += 1
    for block in blocks:
        errors += [f"{block.id}: {e}" for e in _block_errors(block)]
    return Page(file, blocks, inline, errors)


CONFIG_KEY = re.compile(r"(?:^|\s)(model|data|train|mesh|sharding|mopd|distributed)\.([a-z_]+)=")


def _config_key_errors(span: str) -> list[str]:
    """Inline overrides (`train.steps=100`, `mesh.fsdp=-1 mesh.expert=8`) name existing config keys."""
    from mimo_jax.config import Config, to_dict

    schema = to_dict(Config())
    errors = []
    for section, key in CONFIG_KEY.findall(span):
        if key not in schema[section]:
            errors.append(f"{section}.{key} is not a config key "
                          f"(valid under {section}: {', '.join(sorted(schema[section]))})")
    return errors


def _split_sub(arg: str) -> tuple[str, str] | None:
    old, sep, new = arg.partition("=>")
    if not sep:
        return None

    def unquote(s):
        return s.strip()[1:-1] if len(s.strip()) > 1 and s.strip()[0] == s.strip()[-1] == "`" else s.strip()
    return unquote(old), unquote(new)


def _block_errors(block: Block) -> list[str]:
    errors = []
    if block.lang not in RUN_LANGS:
        return errors
    for arg in block.get("sub"):
        pair = _split_sub(arg)
        if pair is None:
            errors.append(f"`sub {arg}` is not of the form `sub OLD => NEW`")
        elif pair[0] not in block.text:
            errors.append(f"`sub`: {pair[0]!r} is not in the block")
    if block.get("reduced") and block.get("sub"):
        errors.append("`sub` and `reduced` exclude each other (write the reduced form in full)")
    if block.get("setup") and block.lang != "python":
        errors.append("`setup` is for python blocks")
    if block.get("server") and block.lang not in SHELL_LANGS:
        errors.append("`server` is for shell blocks")
    for arg in block.get("env"):
        if not re.match(r"^[A-Za-z_]\w*=", arg):
            errors.append(f"`env {arg}` is not of the form NAME=VALUE")
    for arg in block.get("timeout"):
        if not arg.isdigit():
            errors.append(f"`timeout {arg}` is not a number of seconds")
    for arg in block.get("needs") + block.get("provides"):
        for name in arg.replace(",", " ").split():
            if name not in FIXTURES:
                errors.append(f"unknown fixture {name!r} (known: {', '.join(FIXTURES)})")
    for arg in block.get("provides"):
        if arg not in DOC_PROVIDED:
            errors.append(f"`provides {arg}`: only {', '.join(sorted(DOC_PROVIDED))} come from doc blocks")
    if block.lang in SHELL_LANGS:
        errors += _reduced_keeps_programs(block)
    return errors


def _reduced_keeps_programs(block: Block) -> list[str]:
    """A reduced form runs the same programs as the block (with other arguments)."""
    if not block.get("reduced"):
        return []
    try:
        shown = {_program(argv) for argv in shell_commands(shell_script(block.text, block.lang))}
        run = {_program(argv) for argv in shell_commands(block.one("reduced"))}
    except ValueError as e:
        return [str(e)]
    missing = sorted(p for p in shown - run if p)
    return [f"the reduced form does not run {', '.join(missing)}"] if missing else []


# ---------------------------------------------------------------------------------------------
# Shell commands: what a block runs, and the static checks of its project commands


def shell_script(text: str, lang: str) -> str:
    if lang != "console":
        return text
    out, continuing = [], False
    for line in text.splitlines():
        if line.startswith("$ ") or continuing:
            out.append(line[2:] if line.startswith("$ ") and not continuing else line)
            continuing = line.rstrip().endswith("\\")
    return "\n".join(out) + "\n"


def _logical_lines(script: str) -> list[str]:
    lines, current = [], ""
    for line in script.splitlines():
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
            continue
        current += line
        if current.strip() and not current.strip().startswith("#"):
            lines.append(current.strip())
        current = ""
    if current.strip():
        lines.append(current.strip())
    return lines


def shell_commands(script: str) -> list[list[str]]:
    """Each simple command's argv (leading NAME=VALUE assignments dropped)."""
    commands = []
    for line in _logical_lines(script):
        lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
        lexer.whitespace_split = True
        lexer.commenters = "#"
        try:
            tokens = list(lexer)
        except ValueError as e:
            raise ValueError(f"cannot split {line!r}: {e}") from None
        argv: list[str] = []
        for tok in tokens + [";"]:
            if tok and set(tok) <= set(";&|"):
                while argv and re.match(r"^[A-Z_][A-Z0-9_]*=", argv[0]):
                    argv.pop(0)
                if argv:
                    commands.append(argv)
                argv = []
            else:
                argv.append(tok)
    return commands


def _program(argv: list[str]) -> str | None:
    """`train.py`, `mimo_jax.plan`, ... for `python X.py` / `python -m X`; else the command's name."""
    if argv[0] in ("python", "python3"):
        if len(argv) > 2 and argv[1] == "-m":
            return argv[2]
        return argv[1] if len(argv) > 1 else "python"
    return argv[0]


_HELP: dict[tuple[str, ...], str | None] = {}


def _main_of(program: str):
    if program.endswith(".py"):
        return runpy.run_path(str(ROOT / program), run_name="__doc_test__").get("main")
    return getattr(importlib.import_module(program), "main", None)


def program_help(program: str, subcommand: tuple[str, ...] = ()) -> str | None:
    """The program's --help text, from its `main(argv)` in this process (None: no argv-taking main)."""
    key = (program, *subcommand)
    if key not in _HELP:
        main = _main_of(program)
        if main is None or not inspect.signature(main).parameters:
            _HELP[key] = None
        else:
            out = io.StringIO()
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
                try:
                    main([*subcommand, "--help"])
                except SystemExit:
                    pass
            _HELP[key] = out.getvalue()
    return _HELP[key]


def _is_project_program(program: str) -> bool:
    return program.startswith("mimo_jax") or (program.endswith(".py") and (ROOT / program).is_file())


CONFIG_DEFAULTS = {"train.py": "tiny", "mimo_jax.plan": "configs/mimo_v2_flash.yaml", "mimo_jax.demo": "tiny"}


def command_problems(argv: list[str]) -> list[str]:
    """Flags a project command uses that its --help lacks; overrides that do not load."""
    program = _program(argv)
    if not program or not _is_project_program(program):
        return []
    args = argv[3:] if argv[1] == "-m" else argv[2:]
    problems = []
    flags = [a.split("=")[0] for a in args if a.startswith("--")]
    subcommand = ()
    help_text = program_help(program)
    if help_text is not None and args and not args[0].startswith("-"):
        choices = re.search(r"\{([\w,-]+)\}", help_text)
        if choices and args[0] in choices.group(1).split(","):
            subcommand = (args[0],)
            help_text = program_help(program, subcommand)
    if flags and help_text is None:
        problems.append(f"{program}: has no argparse main to check {' '.join(flags)} against")
    for flag in flags:
        if help_text is not None and not re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", help_text):
            problems.append(f"{program} {' '.join(subcommand)}: {flag} is not in its --help")
    overrides = [a for a in args if OVERRIDE.match(a)]
    if program in CONFIG_DEFAULTS or program == "mimo_jax.params":
        from mimo_jax.config import ConfigError, load_config

        config = CONFIG_DEFAULTS.get(program)
        for i, a in enumerate(args):
            if a == "--config" and i + 1 < len(args):
                config = args[i + 1]
            elif a.startswith("--config="):
                config = a.split("=", 1)[1]
        if program == "mimo_jax.params":
            config = next((a for a in args if not a.startswith("-") and not OVERRIDE.match(a)), None)
        if config is not None and (ROOT / config).exists():
            config = str(ROOT / config)
        try:
            if config is not None:
                load_config(config, overrides)
        except (ConfigError, OSError) as e:
            problems.append(f"{program}: {' '.join(overrides)}: {e}")
    return problems


PAGES = {file: parse_page(file) for file in DOC_FILES}
BLOCKS = [b for page in PAGES.values() for b in page.blocks if b.lang in RUN_LANGS | CHECKED_LANGS]
PROVIDERS = {arg: b for b in BLOCKS for arg in b.get("provides")}


# ---------------------------------------------------------------------------------------------
# Running blocks


@dataclasses.dataclass
class Result:
    ok: bool
    output: str
    seconds: float

    def report(self, limit: int = 12000) -> str:
        return self.output if len(self.output) <= limit else "...\n" + self.output[-limit:]


PY_DRIVER = r"""
import contextlib, io, json, os, sys, traceback
proto = os.fdopen(os.dup(1), "w")
os.dup2(2, 1)  # stray writes to fd 1 go to the log, not into the protocol
ns = {"__name__": "__main__"}
for line in sys.stdin:
    req = json.loads(line)
    buf, ok, err = io.StringIO(), True, ""
    try:
        with contextlib.redirect_stdout(buf):
            exec(compile(req["code"], req["name"], "exec"), ns)
    except BaseException:
        ok, err = False, traceback.format_exc()
    proto.write(json.dumps({"ok": ok, "out": buf.getvalue(), "error": err}) + "\n")
    proto.flush()
"""


class PythonSession:
    """One interpreter per page: its python blocks run in order in one namespace."""

    def __init__(self, cwd: Path, env: dict, log: Path):
        self.log = log
        self.proc = subprocess.Popen([sys.executable, "-u", "-c", PY_DRIVER], cwd=cwd, env=env, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=open(log, "w"),
                                     start_new_session=True)
        self.replies: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            self.replies.put(line)
        self.replies.put(None)

    def run(self, code: str, name: str, timeout: float) -> tuple[bool, str]:
        if self.proc.poll() is not None:
            return False, f"the page's Python session has exited\n{self._log_tail()}"
        self.proc.stdin.write(json.dumps({"code": code, "name": name}) + "\n")
        self.proc.stdin.flush()
        try:
            line = self.replies.get(timeout=timeout)
        except queue.Empty:
            self.close()
            return False, f"timed out after {timeout} s\n{self._log_tail()}"
        if line is None:
            return False, f"the Python session died\n{self._log_tail()}"
        reply = json.loads(line)
        return reply["ok"], reply["out"] + (reply["error"] and "\n" + reply["error"] + self._log_tail())

    def _log_tail(self) -> str:
        return "\n--- session stderr (tail) ---\n" + self.log.read_text(errors="replace")[-4000:]

    def close(self):
        if self.proc.poll() is None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


_LIVE: set = set()  # processes running now (killed if the tests stop early)


def _run_process(cmd: list[str], cwd: Path, env: dict, timeout: float) -> tuple[int | None, str]:
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    _LIVE.add(proc)
    try:
        out, _ = proc.communicate(timeout=timeout)
        return proc.returncode, out
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        return None, out + f"\n[timed out after {timeout} s]"
    finally:
        _LIVE.discard(proc)


class Server:
    """A command that serves until stopped: started, waited for until it prints READY, then stopped."""

    def __init__(self, cmd: str, cwd: Path, env: dict):
        self.proc = subprocess.Popen(["bash", "-c", "exec " + cmd], cwd=cwd, env=env, text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        self.lines: list[str] = []
        self.ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append(line)
            if READY in line:
                self.ready.set()
        self.ready.set()

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_ready(self, timeout: float) -> bool:
        return self.ready.wait(timeout) and self.proc.poll() is None and READY in self.output

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
                return None
        return self.proc.returncode


HF_TOKENIZER_SPECIALS = ["<|im_start|>", "<|endoftext|>", "<|im_end|>"]


def write_byte_tokenizer(path: Path) -> None:
    """A tokenizer.json with the byte tokenizer's ids (byte b -> b + 3; id 1 is EOS), which a Hugging
    Face directory needs for serve.py."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):  # GPT-2's byte -> printable character map, as the ByteLevel pre-tokenizer uses
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    vocab = {s: i for i, s in enumerate(HF_TOKENIZER_SPECIALS)}
    vocab.update({ch: b + 3 for b, ch in chars.items()})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(HF_TOKENIZER_SPECIALS)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))


HF_DIR_SCRIPT = """
import sys
import mimo_jax
from mimo_jax.training import load_checkpoint
mimo_jax.save_hf(load_checkpoint("runs/tiny"), sys.argv[1])
"""


def _copy_tree(dst: Path) -> None:
    skip_top = {".git", "runs", ".ci-venv", ".venv", "build", "dist"}
    skip_any = {"__pycache__", ".pytest_cache", ".hypothesis", ".ipynb_checkpoints"}

    def ignore(directory, names):
        top = Path(directory).resolve() == ROOT
        return [n for n in names if n in skip_any or n.endswith(".egg-info") or (top and n in skip_top)]

    shutil.copytree(ROOT, dst, ignore=ignore, symlinks=True)


def _workers() -> int:
    return int(os.environ.get("MIMO_DOC_TEST_WORKERS") or max(2, min(4, os.cpu_count() or 2)))


class Runner:
    """Runs blocks, each once, and makes the fixtures, each once. `prefetch` runs the selected blocks
    on a few worker threads (each block is a subprocess, or a request to its page's session); a test
    then waits for its own block's result."""

    def __init__(self, base: Path, jax_cache: str | None = None):
        self.base = base
        self.tree = base / "tree"
        _copy_tree(self.tree)
        (self.tree / "runs").mkdir(exist_ok=True)
        shims = base / "bin"
        shims.mkdir()
        for name in ("python", "python3"):  # `python` is this interpreter (a script: a symlink would lose the venv)
            (shims / name).write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} "$@"\n')
            (shims / name).chmod(0o755)
        env = dict(os.environ)
        flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", "")).strip()
        env.pop("XLA_FLAGS", None)
        if flags:
            env["XLA_FLAGS"] = flags
        env.pop("MIMO_API_KEY", None)
        env.update({
            "PATH": f"{shims}{os.pathsep}{env.get('PATH', '')}",
            "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1", "MPLBACKEND": "Agg",
            "ALLOW_MULTIPLE_LIBTPU_LOAD": "1",
            # One compilation cache for every command: the tiny model's programs compile once.
            "JAX_COMPILATION_CACHE_DIR": jax_cache or str(base / "jax_cache"),
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
        })
        if importlib.util.find_spec("filelock") is not None:  # jax needs it to evict (least recently used first)
            env["JAX_COMPILATION_CACHE_MAX_SIZE"] = str(2**30)
        self.env = env
        self.sessions: dict[str, PythonSession] = {}
        self.servers: list[Server] = []
        self.timings: list[tuple[str, float, float, str]] = []  # block, seconds, started (since t0), thread
        self.t0 = time.perf_counter()
        self.own_seconds: dict[str, float] = {}  # per block, without the wait for its fixtures
        self._fixtures_ready: dict[str, float] = {}
        self._lock = threading.Lock()
        self._once_futures: dict[str, Future] = {}
        self._jobs: list[tuple[list[Block], set[str]]] = []
        self._closed = False

    def _once(self, key: str, make):
        """make() the first time `key` is asked for, by the thread that asks; others wait for it."""
        with self._lock:
            future = self._once_futures.get(key)
            owner = future is None
            if owner:
                future = self._once_futures[key] = Future()
        if owner:
            try:
                future.set_result(make())
            except BaseException as e:  # noqa: BLE001 - every waiter gets it
                future.set_exception(e)
        return future.result()

    # -- scheduling

    def prefetch(self, blocks: list[Block], seconds: dict[str, float] | None = None) -> None:
        """Starts the blocks on worker threads. A page's Python blocks are one job. A worker takes the
        first job whose fixtures are ready (or can be made now): the fixture providers first, then the
        longest jobs of the last run (`seconds`, per block), else the jobs that need fixtures, in page
        order, before those that need none."""
        jobs, pages = [], set()
        for block in blocks:
            if block.lang == "python":
                if block.file in pages:
                    continue
                pages.add(block.file)
                page = [b for b in blocks if b.file == block.file and b.lang == "python"]
                jobs.append((page, {n for b in page for n in self.static_needs(b)}))
            else:
                jobs.append(([block], set(self.static_needs(block))))

        def rank(job):
            provider = any(b.get("provides") for b in job[0])
            return (not provider, -sum((seconds or {}).get(b.id, 0.0) for b in job[0]), not job[1])

        self._jobs = sorted(jobs, key=rank)
        for _ in range(_workers()):
            threading.Thread(target=self._work, daemon=True).start()

    def _ready(self, fixture: str) -> bool:
        """Made, or makeable now (what it needs is made); not while another thread makes it."""
        future = self._once_futures.get(f"fixture {fixture}")
        if future is None and fixture in PROVIDERS:
            future = self._once_futures.get(f"block {PROVIDERS[fixture].id}")
        if future is not None:
            return future.done()
        return all(self._ready(dep) for dep in FIXTURE_DEPS.get(fixture, ()))

    def _work(self):
        while not self._closed:
            with self._lock:
                # Jobs another thread has started (the tests' own thread runs blocks too) are not taken.
                self._jobs = [j for j in self._jobs if not all(f"block {b.id}" in self._once_futures for b in j[0])]
                if not self._jobs:
                    return
                ready = [job for job in self._jobs if all(self._ready(n) for n in job[1])]
                job = (ready or self._jobs)[0]
                self._jobs.remove(job)
            for block in job[0]:
                self.run(block)

    # -- fixtures

    def require(self, name: str) -> object:
        return self._once(f"fixture {name}", lambda: self._make(name))

    def _make(self, name: str) -> object:
        if name in DOC_PROVIDED:
            block = PROVIDERS.get(name)
            if block is None:
                raise RuntimeError(f"no doc block says `provides {name}`")
            result = self.run(block)
            if not result.ok:
                raise RuntimeError(f"{name} comes from {block.id}, which failed:\n{result.report(4000)}")
            return name
        if name == "hf-dir":
            self.require("tiny-run")
            path = self.base / "hf" / "tiny"
            code, out = _run_process([sys.executable, "-c", HF_DIR_SCRIPT, str(path)], self.tree, self.env, 300)
            if code != 0:
                raise RuntimeError(f"exporting runs/tiny failed:\n{out[-4000:]}")
            write_byte_tokenizer(path)
            return str(path)
        if name == "server":
            self.require("tiny-run")
            server = Server("python serve.py --model runs/tiny --port 0", self.tree, self.env)
            self.servers.append(server)
            if not server.wait_ready(300):
                server.stop()
                raise RuntimeError(f"serve.py did not come up:\n{server.output[-4000:]}")
            return re.search(r"http://[\d.]+:(\d+)/v1", server.output).group(1)
        raise KeyError(name)

    def static_needs(self, block: Block) -> list[str]:
        if block.lang not in RUN_LANGS:
            return []
        text = self._runnable(block) + "\n".join(block.get("setup"))
        names = [n for arg in block.get("needs") for n in arg.replace(",", " ").split()]
        names += [n for n, pattern in FIXTURES.items() if pattern.search(text)]
        return [n for n in dict.fromkeys(names) if n not in block.get("provides")]

    def fill(self, text: str) -> str:
        if "{hf_dir}" in text:
            text = text.replace("{hf_dir}", self.require("hf-dir"))
        if "{port}" in text:
            text = text.replace("{port}", self.require("server"))
        return text

    # -- blocks

    def run(self, block: Block) -> Result:
        return self._once(f"block {block.id}", lambda: self._timed(block))

    def _timed(self, block: Block) -> Result:
        start = time.perf_counter()
        try:
            ok, output = self._run(block)
        except Exception as e:  # noqa: BLE001 - reported by the block's test
            ok, output = False, f"{type(e).__name__}: {e}"
        end = time.perf_counter()
        result = Result(ok, output, end - start)
        with self._lock:
            self.timings.append((block.id, result.seconds, start - self.t0, threading.current_thread().name))
            self.own_seconds[block.id] = end - self._fixtures_ready.get(block.id, start)
        return result

    def _runnable(self, block: Block) -> str:
        if block.get("reduced"):
            return block.one("reduced") + "\n"
        text = shell_script(block.text, block.lang) if block.lang in SHELL_LANGS else block.text
        for arg in block.get("sub"):
            old, new = _split_sub(arg)
            text = text.replace(old, new)
        return text

    def _run(self, block: Block) -> tuple[bool, str]:
        if self._closed:
            return False, "the runner was closed"
        if block.lang == "yaml":
            return check_yaml(block)
        try:
            for name in self.static_needs(block):
                self.require(name)
            code, setup = self.fill(self._runnable(block)), self.fill("\n".join(block.get("setup")))
        except Exception as e:  # noqa: BLE001
            return False, f"a fixture failed: {e}"
        self._fixtures_ready[block.id] = time.perf_counter()
        timeout = int(block.one("timeout") or DEFAULT_TIMEOUT)
        env = dict(self.env, **dict(a.split("=", 1) for a in block.get("env")))
        if block.lang == "python":
            ok, output = self._run_python(block, code, setup, timeout)
        elif block.get("server"):
            ok, output = self._run_servers(code, env, timeout)
        else:
            script = self.base / "scripts" / f"{block.file.replace('/', '_')}_{block.line}.sh"
            script.parent.mkdir(exist_ok=True)
            script.write_text(code)
            rc, output = _run_process(["bash", "-e", "-o", "pipefail", str(script)], self.tree, env, timeout)
            ok = rc == 0
            if not ok:
                output += f"\n[exit status {rc}]"
        missing = [e for e in block.get("expect") if e not in output]
        if ok and missing:
            ok, output = False, output + "\n[expected in the output: " + "; ".join(map(repr, missing)) + "]"
        return ok, f"$ {block.id} ran:\n{code}\n{output}"

    def _session(self, file: str) -> PythonSession:
        def start():
            env = dict(self.env)
            for b in PAGES[file].blocks:
                if b.lang == "python":
                    env.update(dict(a.split("=", 1) for a in b.get("env")))
            session = PythonSession(self.tree, env, self.base / f"session_{file.replace('/', '_')}.log")
            with self._lock:
                self.sessions[file] = session
            return session

        return self._once(f"session {file}", start)

    def _run_python(self, block: Block, code: str, setup: str, timeout: int) -> tuple[bool, str]:
        page_blocks = [b for b in PAGES[block.file].blocks if b.lang == "python"]
        # The blocks above run first (also when this one is selected alone with -k).
        for earlier in page_blocks[: page_blocks.index(block)]:
            self.run(earlier)
        session = self._session(block.file)
        if setup:
            ok, out = session.run(setup, f"{block.id} (doc-test setup)", timeout)
            if not ok:
                return False, "setup failed:\n" + out
        return session.run(code, block.id, timeout)

    def _run_servers(self, script: str, env: dict, timeout: int) -> tuple[bool, str]:
        outputs = []
        for cmd in _logical_lines(script):
            server = Server(cmd, self.tree, env)
            up = server.wait_ready(timeout)
            code = server.stop()
            outputs.append(f"$ {cmd}\n{server.output}[exit status {code}]")
            if not up or code != 0:
                return False, "\n".join(outputs) + ("" if up else f"\n[no {READY!r} line]")
        return True, "\n".join(outputs)

    def close(self):
        self._closed = True
        for session in list(self.sessions.values()):
            session.close()
        for server in self.servers:
            server.stop()
        for proc in list(_LIVE):
            with contextlib.suppress(OSError):
                os.killpg(proc.pid, signal.SIGKILL)


def check_yaml(block: Block) -> tuple[bool, str]:
    """A YAML block parses; if its top-level keys are config sections, they load as overrides."""
    from mimo_jax.config import Config, ConfigError, load_config

    try:
        data = yaml.safe_load(block.text)
    except yaml.YAMLError as e:
        return False, f"not valid YAML: {e}"
    sections = {f.name for f in dataclasses.fields(Config)}
    if not isinstance(data, dict) or not set(data) <= sections:
        return True, "parsed (not a config fragment)"

    def flat(prefix, node):
        if isinstance(node, dict) and prefix.count(".") < 1:
            for k, v in node.items():
                yield from flat(f"{prefix}.{k}" if prefix else k, v)
        else:
            yield f"{prefix}={json.dumps(node)}"

    overrides = list(flat("", data))
    try:
        load_config(str(ROOT / "configs" / "tiny.yaml"), overrides)
    except ConfigError as e:
        return False, f"not a valid config fragment: {e}"
    return True, "a valid config fragment: " + " ".join(overrides)


# ---------------------------------------------------------------------------------------------
# Tests


@pytest.fixture(scope="module")
def runner(tmp_path_factory, request):
    # The compilation cache outlives the run (in .pytest_cache, which --cache-clear empties): a rerun
    # compiles only what changed. MIMO_DOC_TEST_JAX_CACHE names another directory.
    cache = os.environ.get("MIMO_DOC_TEST_JAX_CACHE")
    if not cache and getattr(request.config, "cache", None) is not None:
        cache = str(request.config.cache.mkdir("mimo_jax_doc_tests_jax_cache"))
    r = Runner(tmp_path_factory.mktemp("docs"), cache)
    selected = {item.callspec.params["block"].id for item in request.session.items
                if item.module is request.module and "block" in getattr(getattr(item, "callspec", None), "params", {})}
    cached = getattr(request.config, "cache", None)
    seconds = cached.get(DURATIONS_KEY, {}) if cached is not None else {}
    r.prefetch([b for b in BLOCKS if b.id in selected], seconds)
    yield r
    r.close()
    if cached is not None:  # the next run starts the longest blocks first
        cached.set(DURATIONS_KEY, {**seconds, **{k: round(v, 1) for k, v in r.own_seconds.items()}})
    total = sum(t[1] for t in r.timings)
    print(f"\ndoc blocks: {len(r.timings)} ran in {total:.0f} s of work, {time.perf_counter() - r.t0:.0f} s of wall "
          f"time; slowest: " + ", ".join(f"{t[0]} {t[1]:.0f}s" for t in sorted(r.timings, key=lambda t: -t[1])[:8]))
    if os.environ.get("MIMO_DOC_TEST_TIMELINE"):
        for block, seconds, started, thread in sorted(r.timings, key=lambda t: t[2]):
            print(f"  {started:6.1f} +{seconds:6.1f}  {thread:12s} {block}")


DURATIONS_KEY = "mimo_jax/doc_block_seconds"


def _covered(span: str) -> bool:
    def norm(s):
        return " ".join(s.split())

    target = norm(span)
    for b in BLOCKS:
        if b.lang in SHELL_LANGS and target in norm(" ".join(_logical_lines(shell_script(b.text, b.lang)))):
            return True
    return False


@pytest.mark.parametrize("file", DOC_FILES)
def test_doc_markup(file):
    """Fences carry a language, markers are well-formed and attached, inline commands are tested."""
    page = PAGES[file]
    problems = list(page.errors)
    problems += [f"{file}:{line}: the inline command `{span}` is not part of any tested block; put it in a "
                 "```bash block (or reword it)" for line, span in page.inline if not _covered(span)]
    assert not problems, "\n".join(problems)


def test_fixture_providers_are_unique():
    seen: dict[str, list[str]] = {}
    for b in BLOCKS:
        for name in b.get("provides"):
            seen.setdefault(name, []).append(b.id)
    assert all(len(v) == 1 for v in seen.values()), seen
    assert set(seen) == DOC_PROVIDED, f"every doc-provided fixture needs one block: {seen}"


@pytest.mark.parametrize("block", BLOCKS, ids=lambda b: f"{b.id}-{b.lang}")
def test_doc_block(block, runner):
    errors = _block_errors(block)
    assert not errors, "\n".join(errors)
    if block.lang in SHELL_LANGS:
        problems = [p for argv in shell_commands(shell_script(block.text, block.lang)) for p in command_problems(argv)]
        assert not problems, "\n".join(problems)
    result = runner.run(block)
    assert result.ok, result.report()

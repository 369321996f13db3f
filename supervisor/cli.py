"""The `corral` command.

Every command but `serve` is a client of the server's HTTP API at
CORRAL_HOST (supervisor.cli_client). Errors are one line on stderr and a
non-zero exit status (see EXIT_CODES), so scripts can rely on them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TextIO

from corral.supervisor.cli_client import CannotConnect, ClientError, CorralClient, ServerError
from corral.supervisor.config import DEFAULT_HOST
from corral.supervisor.modelfile import ModelfileError, parameter_value, parse_modelfile

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_CONNECT, EXIT_INTERRUPTED = 0, 1, 2, 3, 130

EPILOG = f"""\
environment:
  CORRAL_HOST     server address (default {DEFAULT_HOST})
  CORRAL_API_KEY  sent as "Authorization: Bearer KEY" when set

exit status:
  0    success
  1    the server answered an error (unknown model, bad request, failed load or pull)
  2    usage error (bad command line)
  3    cannot connect to the server (start it with `corral serve`)
  130  interrupted (Ctrl-C)
"""

Command = Callable[[argparse.Namespace], int]


# ---- formatting -------------------------------------------------------------


def human_size(n: int | float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" or n >= 100 else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"


def _parse_time(text: str) -> datetime | None:
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00"))
    except (TypeError, ValueError):
        return None


def human_duration(seconds: float) -> str:
    seconds = abs(seconds)
    for size, unit in ((86400 * 365, "year"), (86400 * 30, "month"), (86400 * 7, "week"),
                       (86400, "day"), (3600, "hour"), (60, "minute"), (1, "second")):
        if seconds >= size:
            count = int(seconds // size)
            return f"{count} {unit}{'s' if count != 1 else ''}"
    return "less than a second"


def human_ago(text: str) -> str:
    when = _parse_time(text)
    if when is None:
        return text or "-"
    delta = (datetime.now(timezone.utc) - when).total_seconds()
    return "just now" if abs(delta) < 1 else f"{human_duration(delta)} ago"


def human_until(text: str) -> str:
    when = _parse_time(text)
    if when is None:
        return text or "-"
    if when.year >= 2200:
        return "Forever"
    delta = (when - datetime.now(timezone.utc)).total_seconds()
    if delta <= 0:
        return "Stopping..."
    return f"{human_duration(delta)} from now"


def print_table(headers: list[str], rows: list[list[str]], out: TextIO | None = None) -> None:
    out = out or sys.stdout  # looked up per call: output capture replaces sys.stdout after import
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(headers)]
    for row in [headers, *rows]:
        out.write("    ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() + "\n")


def short_id(digest: str) -> str:
    return (digest or "").split(":")[-1][:12]


# ---- pull progress ------------------------------------------------------------


def show_pull(events: Iterator[dict[str, Any]], err: TextIO = sys.stderr) -> dict[str, Any]:
    """Render pull statuses: rich bars on a terminal, one line per status otherwise."""
    if err.isatty():
        return _pull_with_bars(events, err)
    last_status = ""
    event: dict[str, Any] = {}
    for event in events:
        status = str(event.get("status", ""))
        if status != last_status:
            err.write(status + "\n")
            err.flush()
            last_status = status
    return event


def _pull_with_bars(events: Iterator[dict[str, Any]], err: TextIO) -> dict[str, Any]:
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

    console = Console(file=err)
    tasks: dict[str, Any] = {}
    event: dict[str, Any] = {}
    with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                  TransferSpeedColumn(), console=console, transient=False) as bars:
        for event in events:
            status = str(event.get("status", ""))
            if "total" in event:
                if status not in tasks:
                    tasks[status] = bars.add_task(status, total=event["total"] or None)
                bars.update(tasks[status], completed=event.get("completed", 0))
            else:
                bars.console.print(status)
    return event


# ---- commands -----------------------------------------------------------------


def _client(args: argparse.Namespace) -> CorralClient:
    return CorralClient(host=getattr(args, "host", None))


def cmd_list(args: argparse.Namespace) -> int:
    with _client(args) as c:
        models = c.tags()
    rows = [[m.get("name", ""), short_id(m.get("digest", "")), human_size(m.get("size", 0)),
             human_ago(m.get("modified_at", ""))] for m in models]
    print_table(["NAME", "ID", "SIZE", "MODIFIED"], rows)
    return EXIT_OK


def cmd_ps(args: argparse.Namespace) -> int:
    with _client(args) as c:
        models = c.ps()
    rows = [[m.get("name", ""), short_id(m.get("digest", "")), human_size(m.get("size", 0)),
             str(m.get("context_length", "")), human_until(m.get("expires_at", "")),
             str(m.get("pid", ""))] for m in models]
    headers = ["NAME", "ID", "SIZE", "CONTEXT", "UNTIL", "PID"]
    if any(m.get("hosts") for m in models):  # a model spread across hosts: one rank per host
        headers.append("HOSTS")
        for row, m in zip(rows, models, strict=True):
            row.append(",".join(m.get("hosts") or []))
    print_table(headers, rows)
    return EXIT_OK


@contextmanager
def _named(model: str) -> Iterator[None]:
    """A 404 about `model` says it is not found (the server's "try pulling it first" is
    advice for running a model, not for stopping or removing one)."""
    try:
        yield
    except ServerError as e:
        if e.status == 404:
            raise ServerError(404, f"model '{model}' not found") from None
        raise


def cmd_stop(args: argparse.Namespace) -> int:
    with _client(args) as c, _named(args.model):
        c.unload(args.model)
    return EXIT_OK


HF_CACHE_WARNING = ("'{model}' lives in the shared Hugging Face cache: other tools (transformers, "
                    "mlx_lm, huggingface-cli, ...) use the same files, and deleting it removes it for them too.")


def _source(c: CorralClient, model: str) -> str:
    """Where the server keeps `model`: "hf" (the shared Hugging Face cache), "local", or ""
    when it cannot say (e.g. a model whose files no longer read)."""
    try:
        with _named(model):
            return str(c.show(model).get("source", ""))
    except ServerError as e:
        if e.status == 404:
            raise
        return ""


def confirm_delete(model: str, *, yes: bool, ask: Callable[[str], str] | None,
                   err: TextIO = sys.stderr) -> bool:
    """For a model in the shared HF cache: True to go ahead. `ask` reads an answer from a
    terminal (None when there is none: then only --yes goes ahead)."""
    print(HF_CACHE_WARNING.format(model=model), file=err)
    if yes:
        return True
    if ask is None:
        raise ClientError(f"not deleting '{model}' without confirmation (stdin is not a terminal): "
                          f"run `corral rm --yes {model}` to delete it")
    try:
        answer = ask(f"Delete '{model}'? [y/N] ")
    except EOFError:
        answer = ""
    return answer.strip().lower() in ("y", "yes")


def cmd_rm(args: argparse.Namespace) -> int:
    ask = input if sys.stdin.isatty() else None
    with _client(args) as c:
        for model in args.models:
            if _source(c, model) == "hf" and not confirm_delete(model, yes=args.yes, ask=ask):
                print(f"kept '{model}'")
                continue
            with _named(model):
                c.delete(model)  # the server stops a loaded model before removing it
            print(f"deleted '{model}'")
    return EXIT_OK


def cmd_top(args: argparse.Namespace) -> int:
    from corral.supervisor.cli_top import run_top

    with _client(args) as c:
        return run_top(c, once=args.once, interval=args.interval)


def cmd_cp(args: argparse.Namespace) -> int:
    with _client(args) as c:
        c.copy(args.source, args.destination)
    print(f"copied '{args.source}' to '{args.destination}'")
    return EXIT_OK


def cmd_create(args: argparse.Namespace) -> int:
    """`corral create NAME -f Modelfile` (Ollama's form) or `--from DIR|MODEL`."""
    if args.file is not None and Path(args.file).expanduser().is_dir():
        args.source, args.file = args.file, None  # `-f DIR`, as earlier versions took it
    if args.file is None and args.source is None:
        default = Path("Modelfile")
        if not default.is_file():
            raise ServerError(0, "give -f Modelfile (or --from DIR|MODEL); no ./Modelfile here")
        args.file = str(default)
    if args.file is not None:
        path = Path(args.file).expanduser()
        try:
            body = parse_modelfile(path.read_text(encoding="utf-8"), path.resolve().parent)
        except OSError as e:
            raise ServerError(0, f"cannot read {args.file}: {e.strerror or e}") from None
        except ModelfileError as e:
            raise ServerError(0, f"{args.file}: {e}") from None
        source = str(body["from"])
    else:
        source = args.source
        if source.startswith((".", "/", "~")) or Path(source).expanduser().is_dir():
            source = str(Path(source).expanduser().resolve())
        body = {"from": source}
    if args.shards is not None:  # stored with the name: every load of it runs as this many ranks
        body.setdefault("parameters", {})["num_shards"] = args.shards
    with _client(args) as c:
        c.create(args.name, **body)
    print(f"created '{args.name}' from {source}")
    return EXIT_OK


def cmd_pull(args: argparse.Namespace) -> int:
    with _client(args) as c:
        last = show_pull(c.pull(args.model))
    if last.get("status") != "success":
        raise ServerError(0, f"pull of '{args.model}' ended without success")
    if not sys.stderr.isatty():
        return EXIT_OK
    sys.stderr.write("success\n")
    return EXIT_OK


def format_show(info: dict[str, Any]) -> str:
    details = info.get("details") or {}
    model_info = info.get("model_info") or {}
    arch = model_info.get("general.architecture") or details.get("family", "")
    rows = [("architecture", arch), ("parameters", details.get("parameter_size", "")),
            ("context length", model_info.get(f"{arch}.context_length", "")),
            ("embedding length", model_info.get(f"{arch}.embedding_length", "")),
            ("quantization", details.get("quantization_level", ""))]
    out = ["  Model"] + [f"    {k:<20}{v}" for k, v in rows if v not in ("", None)]
    caps = info.get("capabilities") or []
    if caps:
        out += ["", "  Capabilities"] + [f"    {c}" for c in caps]
    params = (info.get("parameters") or "").strip()
    if params:
        out += ["", "  Parameters"] + [f"    {line}" for line in params.splitlines()]
    lic = (info.get("license") or "").strip()
    if lic:
        out += ["", "  License"] + [f"    {line}" for line in lic.splitlines()[:2]]
    return "\n".join(out) + "\n"


def cmd_show(args: argparse.Namespace) -> int:
    with _client(args) as c:
        info = c.show(args.model)
    for flag, key in (("license", "license"), ("modelfile", "modelfile"),
                      ("parameters", "parameters"), ("template", "template"), ("system", "system")):
        if getattr(args, flag, False):
            text = info.get(key)
            if not text:
                print(f"No {key} was specified for this model.")
            else:
                print(str(text).rstrip("\n"))
            return EXIT_OK
    sys.stdout.write(format_show(info))
    return EXIT_OK


def cmd_version(args: argparse.Namespace) -> int:
    import corral.supervisor as supervisor

    try:
        with _client(args) as c:
            server_version = c.version()
    except ClientError:
        print("Warning: could not connect to a running corral instance")
        print(f"Warning: client version is {supervisor.__version__}")
        return EXIT_OK
    print(f"corral version is {server_version}")
    if server_version != supervisor.__version__:
        print(f"Warning: client version is {supervisor.__version__}")
    return EXIT_OK


def _ensure_local(c: CorralClient, model: str) -> None:
    """Pull the model first when the server does not have it, as `ollama run` does."""
    try:
        c.show(model)
    except ServerError as e:
        if e.status != 404:
            raise
        sys.stderr.write(f"model '{model}' is not on disk; pulling it from the Hugging Face Hub\n")
        sys.stderr.flush()
        last = show_pull(c.pull(model))
        if last.get("status") != "success":
            raise ServerError(0, f"pull of '{model}' ended without success") from None


def _request_extras(args: argparse.Namespace, options: dict[str, Any]) -> dict[str, Any]:
    extra: dict[str, Any] = {}
    if args.keepalive is not None:
        extra["keep_alive"] = args.keepalive
    if args.format:
        extra["format"] = _format_value(args.format)
    think = getattr(args, "think", None)
    if think is not None:
        extra["think"] = think
    if options:
        extra["options"] = options
    return extra


def _format_value(text: str) -> Any:
    """--format: "json", or a JSON schema given inline (a value starting with "{")."""
    if text.lstrip().startswith("{"):
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise SystemExit(f"--format: not a JSON schema: {e}") from None
    return text


def _seconds(ns: Any) -> str:
    return f"{(ns or 0) / 1e9:.6f}s"


def _rate(count: Any, ns: Any) -> str:
    return f"{(count or 0) / (ns / 1e9):.2f} tokens/s" if ns else "n/a"


def print_stats(done: dict[str, Any], err: TextIO = sys.stderr) -> None:
    """--verbose: Ollama's timing block (server durations are in nanoseconds)."""
    pc, pd = done.get("prompt_eval_count", 0), done.get("prompt_eval_duration", 0)
    ec, ed = done.get("eval_count", 0), done.get("eval_duration", 0)
    rows = [("total duration", _seconds(done.get("total_duration"))),
            ("load duration", _seconds(done.get("load_duration"))),
            ("prompt eval count", f"{pc} token(s)"), ("prompt eval duration", _seconds(pd)),
            ("prompt eval rate", _rate(pc, pd)), ("eval count", f"{ec} token(s)"),
            ("eval duration", _seconds(ed)), ("eval rate", _rate(ec, ed))]
    err.write("".join(f"{name + ':':<22}{value}\n" for name, value in rows))
    err.flush()


def _print_stream(events: Iterator[dict[str, Any]], key: Callable[[dict[str, Any]], str]) -> dict[str, Any]:
    """Write each piece as it arrives; the final (done) event."""
    last: dict[str, Any] = {}
    ended_with_newline = True
    for event in events:
        piece = key(event)
        if piece:
            sys.stdout.write(piece)
            sys.stdout.flush()
            ended_with_newline = piece.endswith("\n")
        last = event
    if not ended_with_newline:
        sys.stdout.write("\n")
    sys.stdout.flush()
    return last


def think_value(text: str) -> bool | str:
    """--think's value as Ollama's `think`: true/false, or a level."""
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("low", "medium", "high"):
        return lowered
    raise argparse.ArgumentTypeError(f"invalid think value {text!r}: use true, false, low, medium or high")


class ThinkPrinter:
    """The text to print for each streamed piece: reasoning between Ollama's "Thinking..."
    and "...done thinking." lines (or none of it with --hidethinking), then the answer."""

    def __init__(self, *, hide: bool) -> None:
        self.hide = hide
        self.state = "before"  # before, thinking, answer

    def piece(self, thinking: str, content: str) -> str:
        out = ""
        if thinking and not self.hide:
            if self.state == "before":
                out, self.state = "Thinking...\n", "thinking"
            out += thinking
        if content:
            if self.state == "thinking":
                out += "\n...done thinking.\n\n"
            self.state = "answer"
            out += content
        return out


def run_once(c: CorralClient, args: argparse.Namespace, prompt: str) -> int:
    body = {"model": args.model, "prompt": prompt, "stream": True, **_request_extras(args, {})}
    printer = ThinkPrinter(hide=bool(getattr(args, "hidethinking", False)))
    done = _print_stream(c.stream("/api/generate", body), lambda e: printer.piece(
        str(e.get("thinking") or ""), str(e.get("response") or "")))
    if args.verbose:
        print_stats(done)
    return EXIT_OK


SESSION_HELP = """Available Commands:
  /set            set session variables (type /set alone to list them)
  /show           show model information (type /show alone to list what)
  /clear          clear the session context
  /bye            exit
  /?, /help       this help
Use \"\"\" to begin and end a multi-line message. Ctrl-C stops an answer; Ctrl-D exits.
"""

SET_HELP = """Available Commands:
  /set parameter NAME VALUE   set a sampling option (temperature, num_predict, num_ctx, top_p, seed, stop, ...)
  /set system TEXT            set the system message
  /set verbose                show timings and tokens/s after each answer
  /set quiet                  stop showing them
  /set format json            ask for JSON answers
  /set noformat               plain answers
  /set think [LEVEL]          let a thinking model think (LEVEL: low, medium, high)
  /set nothink                turn thinking off
"""

SHOW_HELP = """Available Commands:
  /show info         details for this model
  /show license      the model's license
  /show modelfile    the Modelfile that recreates it
  /show parameters   its parameters and those set in this session
  /show system       its system message
  /show template     its chat template
"""


class Session:
    """The interactive `corral run MODEL`: a chat whose history the client keeps."""

    def __init__(self, client: CorralClient, args: argparse.Namespace) -> None:
        self.client = client
        self.args = args
        self.messages: list[dict[str, Any]] = []
        self.system: str | None = None
        self.options: dict[str, Any] = {}

    def read_message(self) -> str | None:
        """One user message; None at end of input. Handles \"\"\" multi-line blocks."""
        line = input(">>> ")
        if not line.lstrip().startswith('"""'):
            return line
        text = line.lstrip()[3:]
        if text.rstrip().endswith('"""') and text.strip() != "":
            return text.rstrip()[:-3]
        lines = [text] if text else []
        while True:
            more = input("... ")
            if more.rstrip().endswith('"""'):
                lines.append(more.rstrip()[:-3])
                return "\n".join(lines).strip("\n")
            lines.append(more)

    def command(self, line: str) -> bool:
        """Handle a /command; False when the session should end. A failing command
        (the server said no) is reported and the session goes on."""
        try:
            return self._command(line)
        except ClientError as e:
            print(f"Error: {e}")
            return True

    def _command(self, line: str) -> bool:
        words = line.split(maxsplit=3)
        head = words[0].lower()
        if head in ("/bye", "/exit"):
            return False
        if head in ("/?", "/help"):
            print(SESSION_HELP, end="")
        elif head == "/clear":
            self.messages.clear()
            print("Cleared session context")
        elif head == "/set":
            self._set(line, words[1:])
        elif head == "/show":
            self._show(words[1].lower() if len(words) > 1 else "")
        else:
            print(f"Unknown command '{line.strip()}'. Type /? for help")
        return True

    def _set(self, line: str, words: list[str]) -> None:
        what = words[0].lower() if words else ""
        if what == "parameter" and len(words) >= 3:
            name, value = words[1], parameter_value(words[2])
            if name == "stop":
                self.options.setdefault("stop", []).append(str(value))
            else:
                self.options[name] = value
            print(f"Set parameter '{name}' to '{words[2]}'")
        elif what in ("think", "nothink"):
            self.set_think(["/set", *words])
        elif what == "system" and len(words) >= 2:
            self.system = line.split(maxsplit=2)[2].strip().strip('"')
            print("Set system message.")
        elif what in ("verbose", "quiet"):
            self.args.verbose = what == "verbose"
            print("Set 'verbose' mode." if self.args.verbose else "Set 'quiet' mode.")
        elif what == "format" and len(words) >= 2:
            self.args.format = words[1]
            print(f"Set format to '{words[1]}' mode.")
        elif what == "noformat":
            self.args.format = None
            print("Disabled format.")
        else:
            print(SET_HELP, end="")

    def _show(self, what: str) -> None:
        if what not in ("info", "license", "modelfile", "parameters", "system", "template"):
            print(SHOW_HELP, end="")
            return
        info = self.client.show(self.args.model)
        if what == "info":
            sys.stdout.write(format_show(info))
            return
        text = str(info.get(what) or "").rstrip("\n")
        if what == "parameters":
            mine = "\n".join(f"{k:<15}{v}" for k, v in self.options.items())
            text = "\n".join(t for t in (text and f"Model defined parameters:\n{text}",
                                         mine and f"User defined parameters:\n{mine}") if t)
        if what == "system" and self.system:
            text = self.system
        print(text or f"No {what} was specified for this model.")

    def set_think(self, words: list[str]) -> None:
        if words[1] == "nothink":
            self.args.think = False
            print("Set 'nothink' mode.")
            return
        try:
            self.args.think = think_value(words[2]) if len(words) >= 3 else True
        except argparse.ArgumentTypeError as e:
            print(f"Error: {e}", file=sys.stderr)
            return
        print("Set 'think' mode." if self.args.think is True else f"Set 'think' mode to '{self.args.think}'.")

    def answer(self, text: str) -> None:
        self.messages.append({"role": "user", "content": text})
        system = [{"role": "system", "content": self.system}] if self.system else []
        body = {"model": self.args.model, "messages": system + self.messages, "stream": True,
                **_request_extras(self.args, self.options)}
        events = self.client.stream("/api/chat", body)
        parts: list[str] = []
        printer = ThinkPrinter(hide=bool(getattr(self.args, "hidethinking", False)))

        def piece(event: dict[str, Any]) -> str:
            message = event.get("message") or {}
            content = str(message.get("content") or "")
            parts.append(content)
            return printer.piece(str(message.get("thinking") or ""), content)

        try:
            done = _print_stream(events, piece)
        except KeyboardInterrupt:
            # Stop this answer only: closing the stream ends the request on the server.
            events.close()  # type: ignore[attr-defined]
            sys.stdout.write("\n")
            self.messages.pop()
            return
        except ClientError as e:
            self.messages.pop()
            print(f"Error: {e}", file=sys.stderr)
            return
        self.messages.append({"role": "assistant", "content": "".join(parts)})
        if self.args.verbose:
            print_stats(done)
        print()

    def loop(self) -> int:
        try:
            import readline  # noqa: F401  line editing and history for input()
        except ImportError:
            pass
        while True:
            try:
                text = self.read_message()
            except KeyboardInterrupt:
                print("\nUse Ctrl + d or /bye to exit.")
                continue
            except EOFError:
                print()
                return EXIT_OK
            if text is None:
                return EXIT_OK
            if not text.strip():
                continue
            if text.lstrip().startswith("/") and "\n" not in text:
                if not self.command(text.strip()):
                    return EXIT_OK
                continue
            self.answer(text)


def cmd_run(args: argparse.Namespace) -> int:
    prompt = " ".join(args.prompt)
    if not sys.stdin.isatty():
        # `echo text | corral run MODEL [PROMPT]`: stdin is the prompt, or is appended to it.
        piped = sys.stdin.read()
        prompt = f"{prompt}\n\n{piped}" if prompt and piped.strip() else (prompt or piped)
        if not prompt.strip():
            raise ServerError(0, "no prompt: give one as arguments or on stdin")
    with _client(args) as c:
        _ensure_local(c, args.model)
        if not prompt or sys.stderr.isatty():
            # Load now: on a terminal with a spinner; interactively so the first answer does
            # not wait on the load (a no-op when the model is loaded already).
            _load(c, args)
        if prompt:
            return run_once(c, args, prompt)
        return Session(c, args).loop()


def _load(c: CorralClient, args: argparse.Namespace) -> None:
    """Load the model (an empty generate); on a terminal a spinner names it meanwhile, as Ollama's does."""
    body = {"model": args.model, **_request_extras(args, {})}
    if not sys.stderr.isatty():
        c.request("POST", "/api/generate", body)
        return
    from rich.console import Console

    with Console(stderr=True).status(f"loading {args.model}", spinner="dots"):
        c.request("POST", "/api/generate", body)


# ---- parser -------------------------------------------------------------------


def _add(sub: Any, name: str, func: Command, help_text: str, **kw: Any) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = sub.add_parser(name, help=help_text, description=help_text,
                                                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
                                                **kw)
    p.set_defaults(func=func)
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="corral", description="Serve MLX language models.",
                                     epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--version", action="store_true", help="show the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    from corral.supervisor import serve as server

    serve = sub.add_parser("serve", help="start the server",
                           description="start the server: the Ollama, OpenAI and Anthropic APIs on one "
                                       "port, each model in its own runner process")
    server.add_serve_arguments(serve)
    serve.set_defaults(func=server.run_serve)

    run = _add(sub, "run", cmd_run, "run a model: answer PROMPT and exit, or chat interactively")
    run.add_argument("model", metavar="MODEL")
    run.add_argument("prompt", nargs="*", metavar="PROMPT",
                     help="answer this and exit (text on stdin is appended)")
    run.add_argument("--verbose", action="store_true", help="print timings and tokens/s")
    run.add_argument("--keepalive", metavar="DURATION",
                     help="how long the model stays loaded after the answer (5m, 1h, 0, -1)")
    run.add_argument("--nowordwrap", action="store_true", help="accepted for ollama compatibility")
    run.add_argument("--format", metavar="FORMAT", help="structured output: json, or a JSON schema inline")
    run.add_argument("--think", nargs="?", const=True, type=think_value, metavar="LEVEL",
                     help="let a thinking model think (true, false, low, medium, high)")
    run.add_argument("--hidethinking", action="store_true", help="think, but print only the answer")

    pull = _add(sub, "pull", cmd_pull, "download an MLX model from the Hugging Face Hub")
    pull.add_argument("model", metavar="MODEL", help="a Hub repo id, e.g. mlx-community/Qwen3-0.6B-4bit")
    pull.add_argument("--insecure", action="store_true", help="accepted for ollama compatibility")

    _add(sub, "list", cmd_list, "list local models", aliases=["ls"])
    _add(sub, "ps", cmd_ps, "list loaded models")
    stop = _add(sub, "stop", cmd_stop, "unload a running model")
    stop.add_argument("model", metavar="MODEL")
    rm = _add(sub, "rm", cmd_rm, "remove models (stopping them first)")
    rm.add_argument("models", nargs="+", metavar="MODEL")
    rm.add_argument("--yes", "-y", action="store_true",
                    help="do not ask before deleting from the shared Hugging Face cache")
    top = _add(sub, "top", cmd_top, "a live view of the server: memory, models, queue, recent requests "
                                    "(q or Ctrl-C quits)")
    top.add_argument("--once", action="store_true", help="print one frame and exit")
    top.add_argument("--interval", type=float, default=1.0, metavar="SECONDS",
                     help="seconds between refreshes (default 1)")
    show = _add(sub, "show", cmd_show, "show information about a model")
    show.add_argument("model", metavar="MODEL")
    for flag in ("license", "modelfile", "parameters", "template", "system"):
        show.add_argument(f"--{flag}", action="store_true", help=f"show the model's {flag} only")
    cp = _add(sub, "cp", cmd_cp, "copy a model under a new name")
    cp.add_argument("source", metavar="SOURCE")
    cp.add_argument("destination", metavar="DESTINATION")
    create = _add(sub, "create", cmd_create,
                  "create a model from a Modelfile (FROM, SYSTEM, TEMPLATE, PARAMETER, MESSAGE, LICENSE)")
    create.add_argument("name", metavar="NAME", help="the new name, with any tag (mymodel:v2)")
    create.add_argument("--file", "-f", dest="file", metavar="MODELFILE",
                        help="the Modelfile to read (default ./Modelfile)")
    create.add_argument("--from", dest="source", metavar="DIR|MODEL",
                        help="no Modelfile: a model name, or a directory holding config.json, "
                             "*.safetensors and the tokenizer")
    create.add_argument("--shards", type=int, default=None, metavar="N",
                        help="run it as N ranks on N hosts (the hosts setting), whatever its size")
    _add(sub, "version", cmd_version, "show the client and server versions")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)  # usage errors exit 2 here
    # `corral run MODEL --verbose "hi"`: words after a flag are still the prompt.
    if extra and getattr(args, "command", None) == "run" and not any(x.startswith("-") for x in extra):
        args.prompt = [*args.prompt, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.version:
        return cmd_version(args)
    func: Command | None = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return EXIT_OK
    try:
        return int(func(args) or 0)
    except CannotConnect as e:
        print(f"Error: {e}", file=sys.stderr)
        return EXIT_CONNECT
    except ClientError as e:
        print(f"Error: {e}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # `corral list | head`: the reader went away; not an error worth a traceback.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())

"""What every program's command line shares: the parser, flag validators, --device and --precision, user errors.

A mistake the user can fix (bad input, a missing dataset, a checkpoint that does not fit,
a full disk) is a `UserError`; `run_cli` prints it as one line and exits with status 2.
Bugs raise anything else and keep their traceback.
"""

import argparse
import contextlib
import copy
import os
import re
import sys
import tempfile


class UserError(Exception):
    """A mistake the user can fix; programs print it as one sentence, not a traceback."""


class CannotWrite(UserError):
    """A file could not be written (a full disk, an unwritable folder): never a problem of one input, so it stops the program."""


def run_cli(main, argv=None):
    """Call main(argv); a UserError becomes one line on stderr and exit status 2, Ctrl-C exit status 130."""
    try:
        return main(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


class DefaultsOnceFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Each flag's help states its default once: "(default: X)" is added only where there is one to state and the help
    does not already say it in words ("(default: the detector's)"). None, False or nothing as a default means "not
    given" or a switch that is off, which "(default: None)" would only obscure."""

    def _get_help_string(self, action):
        help = action.help or ""
        if action.default is None or action.default is False or action.default in ("", []) or "(default" in help:
            return help
        return super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", DefaultsOnceFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        # One line instead of a usage block: the user needs the mistake, --help has the rest.
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def explicit_flags(parser, argv):
    """The flags the user typed, as opposed to defaults: parse again with every default suppressed."""
    quiet = copy.deepcopy(parser)
    for action in quiet._actions:
        action.default = argparse.SUPPRESS
    return set(vars(quiet.parse_args(argv)))


# -----------------------------------------------------------------------------
# validators for type=

def at_least(lo, kind=int):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not value >= lo:
            raise argparse.ArgumentTypeError(f"must be at least {lo}, got {text}")
        return value
    return parse


def one_of(values, what="one of"):
    def parse(text):
        value = at_least(1)(text)
        if value not in values:
            raise argparse.ArgumentTypeError(f"must be {what} ({', '.join(map(str, values))}), got {text}")
        return value
    return parse


def below_one(text):
    """A number in [0, 1): Adam's beta1."""
    value = at_least(0.0, float)(text)
    if value >= 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def regex(text):
    try:
        re.compile(text)
    except re.error as e:
        raise argparse.ArgumentTypeError(f"is not a regular expression ({e})") from None
    return text


def probability(text):
    value = at_least(0.0, float)(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"must be a probability in [0, 1], got {text}")
    return value


def cores():
    """The CPU cores this process may run on (all of the machine's where the OS cannot say)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


# -----------------------------------------------------------------------------
# --device and --precision

def add_device_flag(parser):
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")


def pick_device(name):
    import torch  # here, not at the top: detect.py --help and its worker processes never load torch (seconds of start-up)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name} asks for CUDA, but PyTorch sees no CUDA GPU here; use --device cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UserError(f"--device {name}: there are only {torch.cuda.device_count()} CUDA devices")
    return device


def use_fast_cuda_kernels(device):
    import torch
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # every step has the same shapes: find the fastest convolutions once
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 tensor cores for fp32 work; GAN training does not need fp32's last bits
        torch.backends.cudnn.allow_tf32 = True


PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def pick_precision(name, device):
    """--precision -> (name, None for fp32 or the autocast dtype); bf16 where the GPU has it, fp16 only on CUDA."""
    import torch
    if name == "auto":
        name = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if name == "fp16" and device.type != "cuda":
        raise UserError("--precision fp16 needs a CUDA GPU (CPUs have no fast fp16 arithmetic); on CPU use fp32 or bf16")
    if name == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UserError(f"this GPU ({torch.cuda.get_device_name(device)}) has no bf16; use --precision fp16 or fp32")
    return name, {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


# -----------------------------------------------------------------------------
# output files and folders: a full disk or an unwritable folder is the user's to fix

def make_folder(path, what="folder"):
    """os.makedirs(path, exist_ok=True), with one sentence instead of a traceback when it cannot be made or written into."""
    if os.path.exists(path) and not os.path.isdir(path):  # makedirs would say "File exists", which reads as no problem at all
        raise CannotWrite(f"{path} is a file, so it cannot be the {what}; give the path of a folder (one that does not exist yet is made)")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise CannotWrite(f"cannot create the {what} {path} ({e.strerror or e}); "
                          "give a folder you can write to, or free space on its disk") from None
    if not os.access(path, os.W_OK | os.X_OK):  # checked now, not when the first file is written after hours of work
        raise CannotWrite(f"cannot write into the {what} {path} (permission denied); give a folder you can write to")


def write_atomically(path, write, tmp=None):
    """write(f) into path.tmp (or tmp), then rename it over path, so a crash mid-write never leaves half a file.

    Every file the programs write goes through here. A full disk or an unwritable folder gives
    one sentence naming the folder, and the temporary file is removed; a stale one from a
    crashed earlier write is simply overwritten. A file that several processes may write at
    once (a shared cache's entry) needs a tmp of each writer's own.
    """
    tmp = tmp or f"{path}.tmp"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())  # on disk before the rename, or a power cut could publish an empty file
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if not isinstance(e, OSError) and not _write_failed(e):
            raise
        why = getattr(e, "strerror", None) or "the write failed; is the disk full?"
        error = CannotWrite(f"cannot write {path} ({why}); free space in {os.path.dirname(os.path.abspath(path))} "
                            "or make it writable, then run again (the last good file is untouched)")
        error.why = why
        raise error from None


def write_or_keep(path, write):
    """write_atomically, and where path cannot be written, the same file in the current folder or else the system's temporary
    folder, so that work which took hours is never thrown away; the error then says where it went. Returns the path written."""
    try:
        write_atomically(path, write)
        return path
    except CannotWrite as e:
        failure = e
    run, base = os.path.basename(os.path.dirname(os.path.abspath(path))), os.path.basename(path)
    for folder in (os.getcwd(), tempfile.gettempdir()):
        kept = os.path.join(folder, f"{run}-{base}")
        n = 1
        while os.path.exists(kept):  # never over a file of the user's, nor over an earlier rescue
            n += 1
            kept = os.path.join(folder, f"{run}-{n}-{base}")
        try:
            write_atomically(kept, write)
        except CannotWrite:
            continue
        raise CannotWrite(f"cannot write {path} ({failure.why}), so it was saved to {kept} instead and nothing is lost; "
                          f"move it to {path} once there is room")
    raise failure


def _write_failed(e):
    """torch.save reports a failed write (a full disk) as a RuntimeError from its zip writer, not as an OSError."""
    return isinstance(e, RuntimeError) and any(m in str(e) for m in ("PytorchStreamWriter", "file write failed", "unexpected pos"))


def write_text(path, text):
    """write_atomically for a str, as UTF-8."""
    write_atomically(path, lambda f: f.write(text.encode("utf-8")))

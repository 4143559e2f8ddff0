"""Typed errors. Every failure a user can cause raises a subclass of DynaexqError whose message
names the file, tensor, option or value that was wrong; the CLI prints that message on one line."""

import json
import numbers
from pathlib import Path


class DynaexqError(Exception):
    """Base class of every error this project raises on purpose."""


class CheckpointError(DynaexqError):
    """A source or converted checkpoint is missing, truncated or corrupt."""


class CheckpointNotFoundError(CheckpointError):
    """A checkpoint directory, weights file or shard listed in an index does not exist."""


class CorruptCheckpointError(CheckpointError):
    """A file exists but cannot be read: bad header, offsets outside the file, truncated data."""


class CheckpointVersionError(CheckpointError):
    """A converted checkpoint in a format version this reader does not read (reconvert it)."""


class OutputExistsError(CheckpointError):
    """The output directory of a conversion already exists (pass overwrite=True to replace it)."""


class MissingTensorError(CheckpointError):
    """A tensor the model needs is not in the checkpoint."""


class UnexpectedTensorError(CheckpointError):
    """A checkpoint holds a tensor the converter does not know what to do with."""


class TensorShapeError(CheckpointError):
    """A tensor has the wrong shape or dtype for the model's config."""


class UnsupportedArchitectureError(DynaexqError):
    """The checkpoint's model_type (or one of its options) is not supported."""


class ConfigError(DynaexqError):
    """A config.json value is missing or inconsistent."""


class QuantFormatError(DynaexqError):
    """An unknown quantization format or a group size that does not divide the input dimension."""


class CalibrationError(DynaexqError):
    """Calibration input for a data-dependent quantizer (gptq) missing, not wanted, or unusable."""


class GenerationError(DynaexqError):
    """Bad generation input: a prompt longer than the cache, bad sampling arguments, ..."""


class PromptTooLongError(GenerationError):
    """A prompt (plus the tokens to generate) does not fit the preallocated cache."""


class SamplingError(GenerationError):
    """A sampling argument is out of range (temperature, top_k, top_p, ...)."""


class BudgetError(DynaexqError):
    """A device-memory budget that cannot be parsed or cannot hold the model."""


class InfeasibleBudgetError(BudgetError):
    """The budget is smaller than the smallest feasible configuration (every expert LO)."""


class RuntimeConfigError(DynaexqError):
    """A bad runtime option: unknown policy or strategy, a segment length or period that makes no sense, ..."""


class ConverterNotInstalledError(DynaexqError):
    """Converting a Hugging Face checkpoint needs the checkpoints_convert package, which is not installed."""


class EvaluationError(DynaexqError):
    """A bad evaluation option (lm-eval model args, tasks, policies) or a request the model cannot serve."""


class ServerError(DynaexqError):
    """The server cannot take a request now: its queue is full, or it is shutting down or failed."""


class QueueFullError(ServerError):
    """Every batch slot is busy and the queue of waiting requests is full (HTTP 429)."""


def check_int(name: str, value, error: type[DynaexqError], *, minimum: int = 1, unit: str = "") -> None:
    """Raise `error` unless value is an integer >= minimum (bools are not counts); `unit` follows
    the bound in the message, e.g. " decode step"."""
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < minimum:
        raise error(f"{name} must be an integer >= {minimum}{unit}, got {value!r}")


def read_json_object(f: Path, error: type[DynaexqError]) -> dict:
    """The JSON object in file f (which exists), or `error` naming f and what is wrong with it."""
    try:
        d = json.loads(Path(f).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{f}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise error(f"{f}: not a JSON object")
    return d

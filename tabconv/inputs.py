"""The inputs a person gives a front end (architecture, weights, image folder, ...), and errors that name them.

The library cannot know how a front end asks for an input: the command line has flags (`--num-classes 10`), the
explorer has sidebar fields (**Classes**). So an `InputError` keeps its message as parts, text and `Ask`s (an
input, and the value to give it where one is known), and each front end words the asks itself with `worded`.
`str(error)` is the command line's wording, so a library user sees the same advice as a shell user.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum


class Input(StrEnum):
    """An input a front end asks for; the value is the command line's flag name."""

    ARCH = "arch"
    WEIGHTS = "weights"
    IMAGES = "images"
    NUM_CLASSES = "num-classes"
    IMAGE_SIZE = "image-size"
    MEAN = "mean"
    STD = "std"
    CHECKPOINT = "checkpoint"
    DATA_ROOT = "data-root"


# What the command line shows for an input whose value the person chooses.
METAVARS = {Input.ARCH: "NAME", Input.WEIGHTS: "FILE", Input.IMAGES: "DIR", Input.NUM_CLASSES: "N",
            Input.IMAGE_SIZE: "PX", Input.MEAN: "M", Input.STD: "S", Input.CHECKPOINT: "FILE",
            Input.DATA_ROOT: "DIR"}


@dataclass(frozen=True)
class Ask:
    """Give `input` (the value `value` where the library knows the right one)."""

    input: Input
    value: str | None = None


Part = str | Ask


def as_flag(ask: Ask) -> str:
    """The command line's wording of an ask: `--num-classes 10`, or `--images DIR` when the person chooses."""
    return f"--{ask.input.value} {ask.value if ask.value is not None else METAVARS[ask.input]}"


class InputError(ValueError):
    """An input that cannot be used. `parts` is the message; `field` the input it concerns (given, else the first
    ask's, else the class's `concerns`), so that a front end can word the advice in its own terms or point at its
    own field; `details` are lines of data under the message (e.g. mismatched keys), shown as they are."""

    concerns: Input | None = None

    def __init__(self, *parts: Part, field: Input | None = None, details: str = "") -> None:
        self.parts = parts
        self.details = details
        asks = [part.input for part in parts if isinstance(part, Ask)]
        self.field = field or (asks[0] if asks else self.concerns)
        super().__init__(self.worded(as_flag) + (f"\n{details}" if details else ""))

    def worded(self, ask: Callable[[Ask], str], text: Callable[[str], str] = str) -> str:
        """The message with every ask worded by `ask` and every piece of text passed through `text` (an escape)."""
        return "".join(ask(part) if isinstance(part, Ask) else text(part) for part in self.parts)

"""What every host's adapter (the ComfyUI nodes, the WebUI tab) does alike: the engine's messages in the host's words,
the class noun check, and which steps get a log line."""
from __future__ import annotations

import re
import time
from typing import Callable

# The engine's messages name its settings and, now and then, a command; a host's user sees inputs, fields, buttons.
_COMMAND = re.compile(r"`python -m trainer ([\w-]+)`(?: or (the [\w ]+? node))?")


def in_host_words(message: str, renames: dict[str, str], commands: dict[str, str]) -> str:
    """`message` in a host's words: each engine setting (`max_train_steps` or `--max-train-steps`) named as in
    `renames`, and a command (`python -m trainer pick-token`, with any "or the ... node" after it) as in `commands`
    (the host's node or button)."""
    def command(match: re.Match) -> str:
        return commands.get(match.group(1)) or match.group(2) or match.group(0)

    message = _COMMAND.sub(command, message)
    for setting, name in renames.items():
        flag = "--" + setting.replace("_", "-")
        message = re.sub(rf"(?<![\w-])(?:{re.escape(setting)}|{re.escape(flag)})(?![\w-])", name, message)
    return message


def require_class_noun(value: str, name: str = "class_noun") -> str:
    """The class noun as the prompts use it; an empty one would make the class prompt 'a' and train on nothing."""
    noun = " ".join(value.split())
    if not noun:
        raise ValueError(f"{name} is empty: type what the subject is, e.g. 'dog', 'backpack' or 'man' (the "
                         "prompts become 'a [identifier] dog' and 'a dog').")
    return noun


def duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class StepLog:
    """Which training steps get a line in the server log: the first, the last, and then one every `every_steps` steps
    or `every_s` seconds, whichever comes first; so a headless run shows it is alive without flooding the log."""

    def __init__(self, every_steps: int = 10, every_s: float = 30.0, clock: Callable[[], float] = time.monotonic):
        self.every_steps, self.every_s, self.clock = every_steps, every_s, clock
        self.last_step: int | None = None
        self.last_time = 0.0

    def line(self, info) -> str | None:
        """A log line for this step (a trainer.callbacks.StepInfo), or None when it is not due."""
        now = self.clock()
        due = (self.last_step is None or info.step >= info.total or info.step - self.last_step >= self.every_steps
               or now - self.last_time >= self.every_s)
        if not due:
            return None
        self.last_step, self.last_time = info.step, now
        return (f"Step {info.step}/{info.total}: loss {info.loss:.4f} (instance {info.instance_loss:.4f}, prior "
                f"{info.prior_loss:.4f}), learning rate {info.lr:.2g}, {duration(info.elapsed_s)} elapsed, about "
                f"{duration(info.eta_s)} left")

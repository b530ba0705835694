"""Protocol conditions by name (docs/method.md §8): ``full``, ``shift`` and ``lowshot-F``. A leaf module, so that
params validation (pipeline.config) and the protocol (pipeline.protocol) share the one parser."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Condition:
    name: str
    kind: str  # full | lowshot | shift
    fraction: float = 1.0

    @classmethod
    def parse(cls, name: str) -> Condition:
        if name in ("full", "shift"):
            return cls(name, name)
        # lowshot-F is canonical (DVC stage names cannot hold '@'); the method file's lowshot@F is accepted too.
        for prefix in ("lowshot-", "lowshot@"):
            if name.startswith(prefix):
                text = name[len(prefix) :]
                try:
                    fraction = float(text)
                except ValueError:
                    raise ValueError(
                        f"condition {name!r}: the low-shot fraction {text!r} is not a number "
                        "(e.g. lowshot-0.1)"
                    ) from None
                # NaN fails both comparisons; 1.0 is `full` under another name, so it is refused too.
                if 0.0 < fraction < 1.0:
                    return cls(name, "lowshot", fraction)
                raise ValueError(f"condition {name!r}: the low-shot fraction {text} is not in (0, 1)")
        raise ValueError(f"unknown condition {name!r} (full, shift or lowshot-<fraction in (0, 1)>)")

"""Shared parts of the core's property tests (tests/test_core_fuzz*.py).

Both feed random byte streams, cut at random points, into a ServerSession and check the
same things about what it wrote back; keeping the cutting and the reply checks here makes
sure they stay the same checks.
"""

from __future__ import annotations

import itertools
import re

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

REPLY_LINE = re.compile(rb"^[2-5][0-9][0-9][ -][^\r\n]*$")

#: the budget both property tests run with: large examples are the point, not a problem
FUZZ_SETTINGS = settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def stream_tokens(commands: list[bytes], pieces: list[bytes]) -> st.SearchStrategy[bytes]:
    """What a random stream is made of: whole command lines, commands without their line
    end, awkward pieces (bare CR/LF, NUL, long runs) and a few random bytes."""
    return st.one_of(
        st.sampled_from(commands).map(lambda line: line + b"\r\n"),
        st.sampled_from(commands),
        st.sampled_from(pieces),
        st.binary(max_size=6),
    )


@st.composite
def split(draw: st.DrawFn, data: bytes) -> list[bytes]:
    """``data`` cut at up to 12 random places (empty pieces included)."""
    cuts = draw(st.lists(st.integers(0, max(len(data), 1)), max_size=12))
    bounds = [0, *sorted(cuts), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


def check_replies(out: bytes, answered: int, errors: int) -> None:
    """Every line the server wrote is a well-formed reply line, and the final lines are
    exactly one per greeting, answered event and protocol error."""
    assert out.endswith(b"\r\n")
    lines = out.split(b"\r\n")[:-1]
    for line in lines:
        assert REPLY_LINE.match(line), line
    finals = [line for line in lines if line[3:4] == b" "]
    assert len(finals) == 1 + answered + errors

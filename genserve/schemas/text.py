"""Text the system can store, log and write into PNG chunks on every backend.

PostgreSQL text cannot hold NUL, UTF-8 cannot encode a lone surrogate, and terminal escapes or other
control characters in a prompt end up in logs and in the AUTOMATIC1111 `parameters` chunk. Such text
is rejected, the same way on SQLite and PostgreSQL, with the field named. Tab, newline and carriage
return stay allowed: they are ordinary in prompts.
"""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import AfterValidator

# C0 controls but \t \n \r, DEL, C1 controls, and UTF-16 surrogates (only ever lone in a Python str).
_FORBIDDEN = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ud800-\udfff]")


def text_problem(value: str) -> str | None:
    """Why `value` cannot be accepted as text, or None when it can."""
    found = _FORBIDDEN.search(value)
    if found is None:
        return None
    char = found.group()
    what = "a lone surrogate" if "\ud800" <= char <= "\udfff" else "a control character"
    return f"contains {what} (U+{ord(char):04X}) at position {found.start()}; it cannot be stored"


def _checked(value: str) -> str:
    problem = text_problem(value)
    if problem:
        raise ValueError(problem)
    return value


# A str field that rejects what `text_problem` finds (a 422 naming the field).
SafeText = Annotated[str, AfterValidator(_checked)]

"""The one exception type for user mistakes: the CLI prints its message (no traceback) and exits 2. And what
the CLI never prints: anything shaped like a Hugging Face token."""

import re

TOKEN_LIKE = re.compile(r"hf_[A-Za-z0-9]{8,}")  # user access tokens are "hf_" + 34 letters and digits


class UserError(Exception):
    """A problem the user can fix (bad input, wrong flag, mismatched files). The message says how."""


def redact_tokens(text: str) -> str:
    """`text` with every token-shaped word replaced by "hf_***" (a token pasted in the wrong place)."""
    return TOKEN_LIKE.sub("hf_***", text)

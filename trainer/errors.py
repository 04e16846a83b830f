"""The one exception type for user mistakes: the CLI prints its message (no traceback) and exits 2. And what
the CLI never prints: anything shaped like a Hugging Face token."""

import re

# user access tokens are "hf_" + 34 letters and digits: a whole word of that shape (not hf_transfer, not a
# path's hf_experiments, which a refusal would block and a redaction garble)
TOKEN_LIKE = re.compile(r"(?<![A-Za-z0-9_])hf_[A-Za-z0-9]{30,}(?![A-Za-z0-9_])")


class UserError(Exception):
    """A problem the user can fix (bad input, wrong flag, mismatched files). The message says how."""


def missing_extra(what: str, package: str, extra: str, then: str = "") -> UserError:
    """The one sentence for an optional package that is not installed: `what` needs `package`, and the extra of
    pyproject.toml that brings it (as the README installs: from the checkout)."""
    return UserError(f'{what} needs {package}: pip install -e ".[{extra}]"{then}.')


def require(module: str, what: str, package: str, extra: str, then: str = "") -> None:
    """Refuse up front, before any long work, where an optional `module` is not installed (`missing_extra`)."""
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise missing_extra(what, package, extra, then)


def redact_tokens(text: str) -> str:
    """`text` with every token-shaped word replaced by "hf_***" (a token pasted in the wrong place)."""
    return TOKEN_LIKE.sub("hf_***", text)


def refuse_tokens(**texts) -> None:
    """One sentence if any of `texts` ({flag: text or list of texts}) holds a token-shaped word: what is sent
    to the Hub or written into a folder is never a token (a token pasted into the wrong flag)."""
    for flag, text in texts.items():
        values = text if isinstance(text, (list, tuple)) else [text]
        if any(isinstance(v, str) and TOKEN_LIKE.search(v) for v in values):
            raise UserError(
                f"--{flag.replace('_', '-')} holds what looks like a Hugging Face token (hf_***); it would be "
                "written where others can read it: take it out (a token goes in HF_TOKEN or --token-file)."
            )

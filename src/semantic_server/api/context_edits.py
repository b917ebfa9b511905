"""Anthropic's context editing (``context_management.edits``), applied where the prompt is
rendered, since its trigger counts the prompt's tokens in the admitted model's tokenizer.

- ``clear_tool_uses_20250919``: once the prompt is over ``trigger`` (default 100,000 input
  tokens, or a number of tool uses), the oldest tool results (all but the last ``keep``,
  default 3, and never those of ``exclude_tools``) are replaced by a placeholder, and with
  ``clear_tool_inputs`` the calls' inputs too; when ``clear_at_least`` tokens cannot be
  freed that way, nothing is cleared (a cleared result changes the prompt from that point
  on, so a small gain is not worth the cache it costs).
- ``clear_thinking_20251015``: earlier turns' thinking is never rendered here (our models
  do not think), so there is never anything to clear.

What was applied is reported in the response's ``context_management.applied_edits``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from semantic_server.api import tools as t
from semantic_server.api.schemas import CLEAR_TOOL_USES, ContextEdit
from semantic_server.engine.service import Rendered, Renderer, render_prompt

CLEARED = "[tool result cleared to save context]"
DEFAULT_TRIGGER_TOKENS = 100_000
DEFAULT_KEEP = 3


@dataclass
class Applied:
    """The edits applied to one request, filled in when its prompt is rendered."""

    edits: list[dict[str, Any]] = field(default_factory=list)


def _clearable(turns: list[t.Turn], edit: ContextEdit) -> list[int]:
    """Indexes of the tool results an edit may clear, oldest first."""
    results = [i for i, turn in enumerate(turns)
               if turn.role == "tool" and turn.name not in edit.exclude_tools
               and turn.content != CLEARED]
    keep = edit.keep.value if edit.keep is not None and not isinstance(edit.keep, str) \
        else DEFAULT_KEEP
    return results[:max(0, len(results) - keep)]


def _cleared(turns: list[t.Turn], indexes: list[int], edit: ContextEdit) -> list[t.Turn]:
    """``turns`` with the results at ``indexes`` cleared (and, as asked, their calls'
    inputs)."""
    ids = {turns[i].call_id for i in indexes}
    wipe = edit.clear_tool_inputs
    out = []
    for i, turn in enumerate(turns):
        if i in indexes:
            turn = replace(turn, content=CLEARED)
        elif turn.calls and wipe:
            turn = replace(turn, calls=tuple(
                replace(call, arguments={}) if call.id in ids and (
                    wipe is True or call.name in wipe) else call for call in turn.calls))
        out.append(turn)
    return out


def _over(edit: ContextEdit, tokens: int, turns: list[t.Turn]) -> bool:
    if edit.trigger is None:
        return tokens > DEFAULT_TRIGGER_TOKENS
    if edit.trigger.type == "tool_uses":
        return sum(len(turn.calls) for turn in turns) > edit.trigger.value
    return tokens > edit.trigger.value


def with_edits(turns: list[t.Turn], make: Callable[[list[t.Turn]], Renderer],
               edits: list[ContextEdit], applied: Applied) -> Renderer:
    """A renderer of ``make(turns)`` that applies ``edits`` first; ``applied`` hears what
    they did."""
    clears = [edit for edit in edits if edit.type == CLEAR_TOOL_USES]

    def render(tokenizer: Any) -> Rendered:
        current = turns
        rendered = make(current)(tokenizer)
        for edit in clears:
            tokens = _count(tokenizer, rendered)
            indexes = _clearable(current, edit)
            if not indexes or not _over(edit, tokens, current):
                continue
            edited = _cleared(current, indexes, edit)
            again = make(edited)(tokenizer)
            freed = tokens - _count(tokenizer, again)
            if edit.clear_at_least is not None and freed < edit.clear_at_least.value:
                continue
            current, rendered = edited, again
            applied.edits.append({"type": edit.type, "cleared_tool_uses": len(indexes),
                                  "cleared_input_tokens": freed})
        return rendered

    return render


def _count(tokenizer: Any, rendered: Rendered) -> int:
    return len(render_prompt(tokenizer, rendered.prompt, **rendered.template_args))

"""Tools the model may call while it reasons: the call format, a stateful Python kernel, and the loop.

`python_kernel` needs the optional `tools` extra (jupyter_client, ipykernel); it is imported only
when the first call runs.
"""

from __future__ import annotations

from cascade_local.tools.calls import Text, ToolCall, ToolCallError, ToolCallParser, parse_call
from cascade_local.tools.loop import (
    DECLINED,
    PYTHON_TOOL,
    PYTHON_TOOL_NAME,
    Answer,
    CallRecord,
    LoopEvent,
    PythonTool,
    Tool,
    ToolLoop,
    make_tools,
)

__all__ = [
    "DECLINED",
    "PYTHON_TOOL",
    "PYTHON_TOOL_NAME",
    "Answer",
    "CallRecord",
    "LoopEvent",
    "PythonTool",
    "Text",
    "Tool",
    "ToolCall",
    "ToolCallError",
    "ToolCallParser",
    "ToolLoop",
    "make_tools",
    "parse_call",
]

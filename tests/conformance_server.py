"""The MCP server `make conformance` tests: the official `mcp` SDK's MCPServer with the conformance
suite's tools, resources and prompts (test_simple_text, test://static-text, ...), on 127.0.0.1.

    python -m tests.conformance_server --port 0    # prints `listening on http://127.0.0.1:PORT/mcp`

Bound to loopback, the SDK turns its own DNS-rebinding protection on, so the suite's
dns-rebinding-protection scenario passes against it directly, as it must through the gateway.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import socket
import sys
import warnings

import uvicorn
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.server.mcpserver.utilities.types import Audio, Image
from mcp.shared.exceptions import MCPDeprecationWarning
from mcp_types import (
    Completion,
    EmbeddedResource,
    ImageContent,
    PromptReference,
    ResourceTemplateReference,
    SamplingMessage,
    TextContent,
    TextResourceContents,
)
from pydantic import BaseModel

# A 1x1 transparent PNG and a few samples of silent 8 kHz WAV: content types, not media.
PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg==")
WAV = (b"RIFF" + (36 + 8).to_bytes(4, "little") + b"WAVEfmt " + (16).to_bytes(4, "little")
       + (1).to_bytes(2, "little") + (1).to_bytes(2, "little") + (8000).to_bytes(4, "little")
       + (8000).to_bytes(4, "little") + (1).to_bytes(2, "little") + (8).to_bytes(2, "little")
       + b"data" + (8).to_bytes(4, "little") + b"\x80" * 8)

server = MCPServer("aenv-conformance", log_level="WARNING")


def embedded(uri: str, text: str) -> EmbeddedResource:
    return EmbeddedResource(type="resource", resource=TextResourceContents(uri=uri, mime_type="text/plain", text=text))


@server.tool()
def test_simple_text() -> str:
    """Plain text."""
    return "This is a simple text response for testing."


@server.tool()
def test_image_content() -> Image:
    """An image."""
    return Image(data=PNG, format="png")


@server.tool()
def test_audio_content() -> Audio:
    """An audio clip (audio/wav)."""
    return Audio(data=WAV, format="wav")


@server.tool()
def test_embedded_resource() -> EmbeddedResource:
    """A resource embedded in the result."""
    return embedded("test://embedded-resource", "This is an embedded resource content.")


@server.tool()
def test_multiple_content_types() -> list[TextContent | ImageContent | EmbeddedResource]:
    """Text, an image and a resource in one result."""
    return [TextContent(type="text", text="Multiple content types test:"),
            ImageContent(type="image", data=base64.b64encode(PNG).decode(), mime_type="image/png"),
            embedded("test://mixed-content-resource", '{"test": "data", "value": 123}')]


@server.tool()
async def test_tool_with_logging(ctx: Context) -> str:
    """Three log notifications while it runs."""
    for step in ("Tool execution started", "Tool processing data", "Tool execution completed"):
        await ctx.info(step)
        await asyncio.sleep(0.05)
    return "Tool with logging executed successfully"


@server.tool()
async def test_tool_with_progress(ctx: Context) -> str:
    """Three progress notifications while it runs."""
    for step in (0, 50, 100):
        await ctx.report_progress(step, 100, f"at {step}%")
        await asyncio.sleep(0.05)
    return "Tool with progress executed successfully"


@server.tool()
def test_error_handling() -> str:
    """Always fails, as a tool error (isError), not a protocol error."""
    raise ToolError("This tool intentionally returns an error for testing")


@server.tool()
async def test_sampling(prompt: str, ctx: Context) -> str:
    """Asks the client's LLM (sampling/createMessage) and returns what it said."""
    answer = await ctx.session.create_message(
        [SamplingMessage(role="user", content=TextContent(type="text", text=prompt))], max_tokens=100)
    content = answer.content
    return f"LLM response: {content.text if isinstance(content, TextContent) else content}"


class UserInfo(BaseModel):
    username: str
    email: str


@server.tool()
async def test_elicitation(message: str, ctx: Context) -> str:
    """Asks the user (elicitation/create) and returns the answer."""
    answer = await ctx.elicit(message, UserInfo)
    return f"User response: action={answer.action}, content={getattr(answer, 'data', None)}"


@server.resource("test://static-text", mime_type="text/plain")
def static_text() -> str:
    return "This is the content of the static text resource."


@server.resource("test://static-binary", mime_type="image/png")
def static_binary() -> bytes:
    return PNG


@server.resource("test://template/{id}/data", mime_type="application/json")
def template_data(id: str) -> str:
    return f'{{"id": "{id}", "templateTest": true, "data": "Data for ID: {id}"}}'


@server.prompt()
def test_simple_prompt() -> str:
    """A prompt without arguments."""
    return "This is a simple prompt for testing."


@server.prompt()
def test_prompt_with_arguments(arg1: str, arg2: str) -> str:
    """A prompt that repeats its two arguments."""
    return f"Prompt with arguments: arg1='{arg1}', arg2='{arg2}'"


@server.prompt()
def test_prompt_with_embedded_resource(resourceUri: str) -> list[EmbeddedResource | TextContent]:
    """A prompt that embeds the resource it is given (the suite names the argument resourceUri)."""
    return [embedded(resourceUri, "Embedded resource content for testing."),
            TextContent(type="text", text="Please process the embedded resource above.")]


@server.prompt()
def test_prompt_with_image() -> list[ImageContent | TextContent]:
    """A prompt with an image."""
    return [ImageContent(type="image", data=base64.b64encode(PNG).decode(), mime_type="image/png"),
            TextContent(type="text", text="Please analyze the image above.")]


@server.completion()  # type: ignore[no-untyped-call, untyped-decorator]
async def complete(ref: PromptReference | ResourceTemplateReference, argument: object, context: object) -> Completion:
    return Completion(values=["test-completion-1", "test-completion-2"], total=2, has_more=False)


def main(argv: list[str]) -> None:
    # Sampling and logging are deprecated by the draft spec (SEP-2577); the suite still tests sampling.
    warnings.filterwarnings("ignore", category=MCPDeprecationWarning)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    listener = socket.create_server(("127.0.0.1", args.port))
    listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    print(f"listening on http://127.0.0.1:{listener.getsockname()[1]}/mcp", flush=True)
    app = server.streamable_http_app(host="127.0.0.1")
    uvicorn_server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    asyncio.run(uvicorn_server.serve(sockets=[listener]))


if __name__ == "__main__":
    main(sys.argv[1:])

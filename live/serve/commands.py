"""The teaching commands, as text messages on `/ws` and as the `/teach`, `/forget` and `/save`
routes: teach frames to a class by name, stop (one refit for all of them), forget a class, save
the taught head, list the classes. Every refusal is ``{"error"}`` and the connection goes on.
"""

from __future__ import annotations

import json

from extract.errors import UserError
from head import checkpoint
from live.serve.state import Client, State, class_list, in_worker

COMMANDS = ("teach", "stop", "forget", "save", "classes")


def parse_command(text: str) -> tuple[str, dict]:
    """A text message: a JSON object with a known ``command``; raises ValueError."""
    try:
        command = json.loads(text)
    except json.JSONDecodeError:
        raise ValueError(
            'a text message must be a JSON command, e.g. {"command": "classes"}'
        ) from None
    if not isinstance(command, dict) or command.get("command") not in COMMANDS:
        name = command.get("command") if isinstance(command, dict) else command
        raise ValueError(f"unknown command {name!r}: one of {', '.join(COMMANDS)}")
    return command["command"], command


async def command_reply(state: State, client: Client, text: str) -> dict:
    """Run one command; every refusal is ``{"error"}`` and the connection goes on."""
    try:
        verb, command = parse_command(text)
        if verb == "teach":
            client.teaching = checked_name(state, command.get("name"))
            client.examples = []
            return {"teaching": client.teaching}
        if verb == "stop":
            return await stop_teaching(state, client)
        if verb == "forget":
            return await forget(state, checked_name(state, command.get("name")))
        if verb == "save":
            return await save(state, command.get("path", "."))
        return await in_worker(state, class_list, state.predictor)
    except (ValueError, UserError) as refused:
        return {"error": str(refused)}


def checked_name(state: State, name: object) -> str:
    """A class name as the predictor's lessons allow it (text, at most their max_name_length
    characters, the check `teach` makes again at stop); raises UserError."""
    if name is None:
        raise UserError('a class name is needed: {"command": ..., "name": "..."}')
    return state.predictor.lessons.valid_name(name)


async def stop_teaching(state: State, client: Client) -> dict:
    """Teach the frames kept since ``teach`` to its class: one refit for them all."""
    name, examples = client.teaching, client.examples
    client.teaching, client.examples = None, []
    if name is None:
        raise UserError('nothing is being taught: send {"command": "teach", "name": ...} first')
    if not examples:
        raise UserError(f"no frame arrived while teaching {name!r}")

    def teach() -> dict:
        count = state.predictor.teach(name, examples)
        return {"learned": {"name": name, "examples": count}} | class_list(state.predictor)

    return await in_worker(state, teach)


async def forget(state: State, name: str) -> dict:
    def forget_name() -> dict:
        state.predictor.forget(name)
        return {"forgot": name} | class_list(state.predictor)

    return await in_worker(state, forget_name)


async def save(state: State, path: object) -> dict:
    """Save into a folder inside the save folder; any path that leaves it is refused."""
    root = state.settings.save_dir.resolve()
    if not isinstance(path, str):
        raise UserError('"path" must be a folder name inside the save folder')
    folder = (root / path).resolve()
    if not folder.is_relative_to(root):
        raise UserError(f"save path {path!r} is outside the save folder {root} (--save-dir)")
    model = state.settings.model
    if model is not None and (folder / checkpoint.BEST).resolve() == model.resolve():
        raise UserError(f"save path {path!r} would overwrite the model being served ({model})")
    saved = await in_worker(state, state.predictor.save, folder)
    return {"saved": str(saved)}

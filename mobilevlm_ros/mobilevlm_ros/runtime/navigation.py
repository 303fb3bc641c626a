"""Navigation as a choice: the question asked about a frame for an instruction, and the actions it chooses from."""

NAVIGATION_ACTIONS = ("move_forward", "turn_left", "turn_right", "stop")
NAVIGATION_PROMPT = "{instruction}\nAnswer with one of: {actions}."


def navigation_question(instruction: str, actions: list[str] | tuple[str, ...], template: str = NAVIGATION_PROMPT) -> str:
    """The question `Session.choose` scores the actions against ({instruction} and {actions} filled in)."""
    return template.format(instruction=instruction, actions=", ".join(actions))

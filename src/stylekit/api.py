"""The task functions scripts import; the CLI is a thin layer over these.

    from stylekit.api import stylize
    from stylekit.runner import Output
    report = stylize(["photos/"], style=["ref.jpg"], preset="lcm-sd15", output=Output("styled/", seed=1))

`open_session` gives callers that handle their own files one loaded run: the model is loaded and
the prompt and style embeddings are computed once, then any number of images go through it.
"""

from stylekit.session import Runtime, Session, open_session
from stylekit.tasks.inpaint import inpaint
from stylekit.tasks.stylize import stylize
from stylekit.tasks.t2i import t2i_styled
from stylekit.tasks.textures import texture, texture_expand
from stylekit.tasks.video import stylize_video

__all__ = [
    "Runtime",
    "Session",
    "inpaint",
    "open_session",
    "stylize",
    "stylize_video",
    "t2i_styled",
    "texture",
    "texture_expand",
]

"""The commands, each a thin composition of the batch contract (`stylekit.runner`) and one
loaded run (`stylekit.session`): stylize, t2i, inpaint, video, textures."""

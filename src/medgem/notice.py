"""The clinical-safety notice that every surface (CLI, API, web page) carries."""

NOTICE = (
    "medgem is not a medical device. Its outputs may be wrong and must be reviewed by a "
    "qualified healthcare professional before any clinical use."
)

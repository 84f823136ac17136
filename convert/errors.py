"""One error type for the pipeline: the CLI prints its message on one line and exits non-zero."""


class PipelineError(Exception):
    """A problem with the input or the environment that the user can fix; the message says what."""

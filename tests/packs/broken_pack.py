"""A custom node pack that fails to import: it must be logged with its traceback and skipped."""

raise ImportError("this pack needs a library that is not installed")

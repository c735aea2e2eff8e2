"""Reports built from stored results only: aggregate (numbers) -> plots (figures) -> render (files)."""

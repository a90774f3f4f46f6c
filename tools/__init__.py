"""Developer tools, run from the project root; nothing in the pipeline imports them."""

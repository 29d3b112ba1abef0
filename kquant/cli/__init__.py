"""Command-line tools, thin layers over the library (each module's `main` is an entry point)."""

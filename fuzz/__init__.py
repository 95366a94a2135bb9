"""Coverage-guided fuzzing of pyovpn's parsers with atheris (see fuzz/README.md)."""

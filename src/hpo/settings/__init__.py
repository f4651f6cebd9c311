"""Study files: the TOML a study is declared in, read and checked; never imports torch."""

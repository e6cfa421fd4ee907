"""The clpt command line (installed as clpt_cli)."""

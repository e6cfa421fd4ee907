from clpt_cli.main import main

main()

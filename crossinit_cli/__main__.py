from crossinit_cli.cli import main

main()

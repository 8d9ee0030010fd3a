from puma_cli.cli import main

main()

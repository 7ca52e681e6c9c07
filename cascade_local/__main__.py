from cascade_local.cli.app import main

main()

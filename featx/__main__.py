from featx.cli import main

main()

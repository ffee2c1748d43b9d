from ctrserve.cli import main

main()

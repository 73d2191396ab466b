from emu2.data.shapes.cli import main

main()

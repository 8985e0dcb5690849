import sys

from tests.abuse.battery import main

main(sys.argv[1:])

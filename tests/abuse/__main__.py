from tests.abuse.battery import main

main()

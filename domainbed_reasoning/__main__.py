from domainbed_reasoning.cli import main

main()

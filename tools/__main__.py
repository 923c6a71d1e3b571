"""`python -m ggforge.tools ...` runs the ggforge command line."""
from ggforge.tools.cli import main

main()

import sys

from latent_prior.cli import main

sys.exit(main())

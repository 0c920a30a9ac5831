"""The tables a data owner uploads, and their differentially private mock twins."""

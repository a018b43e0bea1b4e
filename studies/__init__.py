"""Scripts that produce the study's numbers and the results the app ships.

Run each as a module from the repository root (`python -m studies.study`); results go to
studies/results/ (the shipped demo results to cache/demo/).
"""

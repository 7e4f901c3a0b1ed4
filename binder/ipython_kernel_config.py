# Every kernel loads nbengine's extension: %%generate, %%chat and %nbengine work without %load_ext.
c = get_config()  # noqa: F821 - provided by IPython when it reads this file
c.InteractiveShellApp.extensions = ["nbengine"]

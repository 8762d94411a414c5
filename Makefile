# The two commands: `make run` (whole pipeline, quick profile) and `make test`.
# `make setup` = `make install` (the name the RunPod guide uses); `make lab` opens the notebooks in JupyterLab.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PROFILE ?= quick
# JupyterLab address: localhost by default; on a pod reached through an exposed port, LAB_IP=0.0.0.0.
LAB_IP ?= 127.0.0.1
LAB_PORT ?= 8888
LAB_ARGS ?=
KERNEL_NAME := ironman-nb
KERNEL_DISPLAY := Python (ironman_nb)

.PHONY: install setup kernel lab run test clean-runs

# The stamp says which checkout the environment was installed for (its editable install points there) and is
# dropped when that is another folder (a moved or copied checkout) or the environment's Python no longer runs
# (a volume reused with another image): the next install then repairs the environment.
ifneq ($(wildcard $(STAMP)),)
ifneq ($(shell cat $(STAMP) 2>/dev/null)|$(shell $(PY) -c 'print(1)' 2>/dev/null),$(CURDIR)|1)
$(shell rm -f $(STAMP))
endif
endif

install: $(STAMP) kernel

setup: install

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml scripts/install.sh
	bash scripts/install.sh $(VENV)
	echo "$(CURDIR)" > $(STAMP)

# The Jupyter kernel the notebooks name, pointing at this checkout's .venv. Registered in the user's Jupyter
# folder (seen by a pod's own JupyterLab too), again on every install: it takes a fraction of a second, and a
# stopped pod loses the home folder it lives in.
kernel: $(STAMP)
	@$(PY) -m ipykernel install --user --name $(KERNEL_NAME) --display-name "$(KERNEL_DISPLAY)" >/dev/null

lab: install
	$(PY) -m jupyterlab --ServerApp.root_dir="$(CURDIR)" --LabApp.default_url=/lab/tree/notebooks \
		--ServerApp.ip=$(LAB_IP) --ServerApp.port=$(LAB_PORT) --ServerApp.allow_root=True $(LAB_ARGS)

run: install
	$(PY) -m ironman_nb run --profile $(PROFILE)

test: install
	@bash scripts/install_browser.sh
	$(PY) -m pytest -q tests

clean-runs:
	rm -rf runs

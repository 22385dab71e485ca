# vla — set-up, tests and curricula. Targets are files (stamps and manifests), so `make`
# reruns only what is missing or stale and an interrupted curriculum resumes where it stopped.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
VLA := $(BIN)/vla
STAMP := $(VENV)/.vla-installed

# Offline by default: the embedded world needs no network; real models must be on disk.
# VLA_ONLINE=1 (in the environment or on the make line) lets the libraries download.
ifneq ($(VLA_ONLINE),1)
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export YOLO_OFFLINE ?= 1
endif
export VLA_ONLINE
export YOLO_CONFIG_DIR ?= $(CURDIR)/.yolo

# ---- results pages -----------------------------------------------------------------------
# Each curriculum (and `make bench`) ends by writing its table to docs/results/NAME.md, stamped
# with the commit, the machine and the wall time, and copying it into README.md (vla/docs.py).
# Only the default runs write there; a run elsewhere (RUNS=runs/proclip-vitl) names its own page:
#   make proclip RUNS=runs/proclip-vitl ... PROCLIP_PAGE=docs/results/proclip-vitl.md
DOCS ?= $(BIN)/python -m vla.docs
# $(call results_page,NAME,EVAL_DIR,TARGET,PAGE): write the page when PAGE is set, then the README's rows
results_page = $(if $(4),$(DOCS) eval $(1) $(2) --make '$(3)' --out $(4) && $(DOCS) readme,@true)

# ---- the ProCLIP curriculum -------------------------------------------------------------
# Embedded default (no arguments): synthetic world → small CLIP → distill (MiniLM) →
# contrast-tune → LLM2CLIP baseline → eval side by side → export.
# Real models on 8 GPUs (see docs/gpus.md):
#   make proclip NPROC=8 TEACHER=clip-vit-l EMBEDDER=qwen DATA='/data/shards/{00000..00999}.tar' \
#                EVAL=/data/evalsets RECIPES=recipes/gpu RUNS=runs/proclip-vitl
# DATA is anything `vla --data` takes (a directory, a brace range, a glob, pipe:CMD); it is quoted
# in the recipes below, so braces reach vla (webdataset's expansion), not the shell.
RUNS ?= runs/proclip
# recipes/<scale>/: smoke (tests), embedded (the embedded world) or gpu (real models): one
# directory per method, which the three curricula read, beside the shared pretrain.yaml (the base CLIP)
RECIPES ?= recipes/embedded
PROCLIP_RECIPES ?= $(RECIPES)/proclip
WORLD ?= data/toy
DATA ?= $(WORLD)
EVAL ?= $(DATA)
EMBEDDER ?= minilm
# each run gets its own export: runs/proclip → exports/proclip, runs/proclip-vitl → exports/proclip-vitl
EXPORT ?= exports/$(notdir $(RUNS))
PROCLIP_PAGE ?= $(if $(filter runs/proclip,$(RUNS)),docs/results/proclip.md)
SYNTH_RECIPE ?= recipes/embedded/synth.yaml
VLA_FLAGS ?=
# Training stages (pretrain, distill, contrast-tune) run under torchrun with NPROC processes on
# this node; eval and export run once. For several nodes, give the whole launcher instead:
#   LAUNCH=".venv/bin/torchrun --nnodes 2 --node-rank 0 --master-addr HOST --nproc-per-node 8"
NPROC ?=
LAUNCH ?= $(if $(NPROC),$(BIN)/torchrun --standalone --nproc-per-node $(NPROC),)

# the world is built only when DATA is the embedded one
DATA_DEP := $(if $(filter $(WORLD),$(DATA)),$(WORLD)/manifest.json,)
# with no TEACHER the curriculum pre-trains its own small CLIP first
ifeq ($(origin TEACHER),undefined)
TEACHER := $(RUNS)/clip
TEACHER_DEP := $(RUNS)/clip/manifest.json
endif

.PHONY: proclip world
proclip: $(EXPORT)/manifest.json
	@$(VLA) inspect $(RUNS)/eval >/dev/null
	@echo; echo "ProCLIP curriculum ($(RUNS)) — evaluation:"; cat $(RUNS)/eval/results.md
	$(call results_page,proclip,$(RUNS)/eval,make proclip,$(PROCLIP_PAGE))

world: $(WORLD)/manifest.json

$(WORLD)/manifest.json: $(SYNTH_RECIPE) | $(STAMP)
	$(VLA) synth --out $(WORLD) --recipe $(SYNTH_RECIPE) --force $(VLA_FLAGS)

$(RUNS)/clip/manifest.json: $(DATA_DEP) $(RECIPES)/pretrain.yaml | $(STAMP)
	$(LAUNCH) $(VLA) pretrain --data '$(DATA)' --out $(RUNS)/clip --recipe $(RECIPES)/pretrain.yaml --force $(VLA_FLAGS)

$(RUNS)/distill/manifest.json: $(DATA_DEP) $(TEACHER_DEP) $(PROCLIP_RECIPES)/distill.yaml | $(STAMP)
	$(LAUNCH) $(VLA) distill --data '$(DATA)' --teacher $(TEACHER) --embedder $(EMBEDDER) --out $(RUNS)/distill \
	  --recipe $(PROCLIP_RECIPES)/distill.yaml --force $(VLA_FLAGS)

$(RUNS)/contrast/manifest.json: $(RUNS)/distill/manifest.json $(PROCLIP_RECIPES)/contrast-tune.yaml | $(STAMP)
	$(LAUNCH) $(VLA) contrast-tune --data '$(DATA)' --init $(RUNS)/distill --out $(RUNS)/contrast \
	  --recipe $(PROCLIP_RECIPES)/contrast-tune.yaml --force $(VLA_FLAGS)

$(RUNS)/llm2clip/manifest.json: $(DATA_DEP) $(TEACHER_DEP) $(PROCLIP_RECIPES)/llm2clip.yaml | $(STAMP)
	$(LAUNCH) $(VLA) contrast-tune --data '$(DATA)' --init random --clip $(TEACHER) --embedder $(EMBEDDER) \
	  --out $(RUNS)/llm2clip --recipe $(PROCLIP_RECIPES)/llm2clip.yaml --force $(VLA_FLAGS)

$(RUNS)/eval/manifest.json: $(RUNS)/contrast/manifest.json $(RUNS)/llm2clip/manifest.json $(TEACHER_DEP) $(PROCLIP_RECIPES)/eval.yaml
	$(VLA) eval $(TEACHER) $(RUNS)/llm2clip $(RUNS)/contrast --data '$(EVAL)' --out $(RUNS)/eval \
	  --recipe $(PROCLIP_RECIPES)/eval.yaml --force $(VLA_FLAGS)

$(EXPORT)/manifest.json: $(RUNS)/contrast/manifest.json $(RUNS)/eval/manifest.json
	$(VLA) export $(RUNS)/contrast --out $(EXPORT) --force

# ---- the DCLIP curriculum ---------------------------------------------------------------
# Embedded default (no arguments): the same world and base CLIP as `make proclip` (built once,
# shared) → a YOLO trained on the world → regions → meta-teacher → student → eval of the base
# CLIP and the student side by side → export.
# Real models:  make dclip CLIP=clip-vit-b-16 DETECTOR=/path/yolov8x.pt DATA=/path/to/shards EVAL=/path/to/evalsets \
#                          RECIPES=recipes/gpu DCLIP_RUNS=runs/dclip-vitb16
DCLIP_RUNS ?= runs/dclip
DCLIP_RECIPES ?= $(RECIPES)/dclip
DCLIP_EXPORT ?= exports/$(notdir $(DCLIP_RUNS))
DCLIP_PAGE ?= $(if $(filter runs/dclip,$(DCLIP_RUNS)),docs/results/dclip.md)
DCLIP_ABL_PAGE ?= $(if $(filter runs/dclip,$(DCLIP_RUNS)),docs/results/dclip-ablations.md)
# with no CLIP, DCLIP starts from the base CLIP `make proclip` pre-trains (the same file target)
ifeq ($(origin CLIP),undefined)
CLIP := $(RUNS)/clip
CLIP_DEP := $(RUNS)/clip/manifest.json
endif
# with no DETECTOR, a YOLO is trained on the embedded world's YOLO copy
ifeq ($(origin DETECTOR),undefined)
DETECTOR := $(DCLIP_RUNS)/detector
DETECTOR_DEP := $(DCLIP_RUNS)/detector/manifest.json
endif

.PHONY: dclip
dclip: $(DCLIP_EXPORT)/manifest.json
	@$(VLA) inspect $(DCLIP_RUNS)/eval >/dev/null
	@echo; echo "DCLIP curriculum ($(DCLIP_RUNS)) — evaluation:"; cat $(DCLIP_RUNS)/eval/results.md
	$(call results_page,dclip,$(DCLIP_RUNS)/eval,make dclip,$(DCLIP_PAGE))

$(DCLIP_RUNS)/detector/manifest.json: $(WORLD)/manifest.json $(DCLIP_RECIPES)/train-detector.yaml | $(STAMP)
	$(VLA) train-detector --data $(WORLD) --out $(DCLIP_RUNS)/detector --recipe $(DCLIP_RECIPES)/train-detector.yaml \
	  --force $(VLA_FLAGS)

$(DCLIP_RUNS)/regions/manifest.json: $(DATA_DEP) $(CLIP_DEP) $(DETECTOR_DEP) $(DCLIP_RECIPES)/precompute-regions.yaml | $(STAMP)
	$(VLA) precompute-regions --data $(DATA) --detector $(DETECTOR) --clip $(CLIP) --out $(DCLIP_RUNS)/regions \
	  --recipe $(DCLIP_RECIPES)/precompute-regions.yaml --force $(VLA_FLAGS)

$(DCLIP_RUNS)/teacher/manifest.json: $(DCLIP_RUNS)/regions/manifest.json $(DCLIP_RECIPES)/train-teacher.yaml | $(STAMP)
	$(LAUNCH) $(VLA) train-teacher --regions $(DCLIP_RUNS)/regions --out $(DCLIP_RUNS)/teacher \
	  --recipe $(DCLIP_RECIPES)/train-teacher.yaml --force $(VLA_FLAGS)

$(DCLIP_RUNS)/student/manifest.json: $(DCLIP_RUNS)/teacher/manifest.json $(DCLIP_RECIPES)/train-student.yaml | $(STAMP)
	$(LAUNCH) $(VLA) train-student --teacher $(DCLIP_RUNS)/teacher --out $(DCLIP_RUNS)/student \
	  --recipe $(DCLIP_RECIPES)/train-student.yaml --force $(VLA_FLAGS)

$(DCLIP_RUNS)/eval/manifest.json: $(DCLIP_RUNS)/student/manifest.json $(CLIP_DEP) $(DCLIP_RECIPES)/eval.yaml
	$(VLA) eval $(CLIP) $(DCLIP_RUNS)/student --data $(EVAL) --out $(DCLIP_RUNS)/eval \
	  --recipe $(DCLIP_RECIPES)/eval.yaml --force $(VLA_FLAGS)

$(DCLIP_EXPORT)/manifest.json: $(DCLIP_RUNS)/student/manifest.json $(DCLIP_RUNS)/eval/manifest.json
	$(VLA) export $(DCLIP_RUNS)/student --out $(DCLIP_EXPORT) --force

# ---- DCLIP's ablations and claims (c), (d) ----------------------------------------------------
# On the world, base CLIP, detector, regions and teacher of `make dclip` (the same file targets):
# every arm trains the same student budget (train-student.yaml's steps, batch and lr) and one
# `vla eval` scores the base CLIP and every arm side by side on the test split (so the arms skip
# their own end-of-training eval). Nothing is chosen
# on it (the teacher epoch and budgets are fixed in the recipes; per-epoch curves use val).
#   full DCLIP          $(DCLIP_RUNS)/student            YOLO regions, bidirectional teacher, epoch 2
#   oracle boxes        student-oracle                   the world's exact boxes instead of the YOLO's
#   no regions          student-noregions                teacher on the global embedding only (top_k 0)
#   no bidir. attention student-average                  teacher without cross-attention (fusion average)
#   no teacher          student-noteacher                InfoNCE only (distill_weight 0)
#   converged teacher   student-converged                from a 12-epoch teacher's last epoch (claim d)
#   image negatives     student-negatives                vla's variant: teacher trained with L_img too
DCLIP_ABL ?= $(DCLIP_RUNS)/ablations
DCLIP_ARMS := oracle noregions average noteacher converged negatives
# the arms' teachers are intermediate files to make: keep them (they are artifacts, not scratch)
.SECONDARY: $(foreach a,oracle noregions average converged negatives,$(DCLIP_ABL)/teacher-$(a)/manifest.json)

.PHONY: dclip-ablations dclip-epochs
dclip-ablations: $(DCLIP_ABL)/eval/manifest.json
	@$(VLA) inspect $(DCLIP_ABL)/eval >/dev/null
	@echo; echo "DCLIP ablations ($(DCLIP_ABL)), one student budget for every arm — evaluation:"
	@cat $(DCLIP_ABL)/eval/results.md
	$(call results_page,dclip-ablations,$(DCLIP_ABL)/eval,make dclip-ablations,$(DCLIP_ABL_PAGE))

$(DCLIP_ABL)/regions-oracle/manifest.json: $(DATA_DEP) $(CLIP_DEP) $(DCLIP_RECIPES)/precompute-regions.yaml | $(STAMP)
	$(VLA) precompute-regions --data $(DATA) --detector oracle --clip $(CLIP) --out $(@D) \
	  --recipe $(DCLIP_RECIPES)/precompute-regions.yaml --force $(VLA_FLAGS)

$(DCLIP_ABL)/teacher-oracle/manifest.json: $(DCLIP_ABL)/regions-oracle/manifest.json $(DCLIP_RECIPES)/train-teacher.yaml | $(STAMP)
	$(LAUNCH) $(VLA) train-teacher --regions $(DCLIP_ABL)/regions-oracle --out $(@D) \
	  --recipe $(DCLIP_RECIPES)/train-teacher.yaml --force $(VLA_FLAGS)

# the teacher arms on the YOLO regions: teacher-noregions, teacher-average, teacher-converged, teacher-negatives
$(DCLIP_ABL)/teacher-%/manifest.json: $(DCLIP_RUNS)/regions/manifest.json $(DCLIP_RECIPES)/train-teacher-%.yaml | $(STAMP)
	$(LAUNCH) $(VLA) train-teacher --regions $(DCLIP_RUNS)/regions --out $(@D) \
	  --recipe $(DCLIP_RECIPES)/train-teacher-$*.yaml --force $(VLA_FLAGS)

# a student per teacher arm, with train-student.yaml (converged: its own recipe, the teacher's last epoch)
$(DCLIP_ABL)/student-%/manifest.json: $(DCLIP_ABL)/teacher-%/manifest.json $(DCLIP_RECIPES)/train-student.yaml | $(STAMP)
	$(LAUNCH) $(VLA) train-student --teacher $(DCLIP_ABL)/teacher-$* --out $(@D) \
	  --recipe $(if $(filter converged,$*),$(DCLIP_RECIPES)/train-student-converged.yaml,$(DCLIP_RECIPES)/train-student.yaml) \
	  --set 'eval.sets=[]' --force $(VLA_FLAGS)

$(DCLIP_ABL)/student-converged/manifest.json: $(DCLIP_RECIPES)/train-student-converged.yaml

# no teacher: the full arm's teacher names CLIP, data and regions; its embeddings are never computed
$(DCLIP_ABL)/student-noteacher/manifest.json: $(DCLIP_RUNS)/teacher/manifest.json $(DCLIP_RECIPES)/train-student-noteacher.yaml | $(STAMP)
	$(LAUNCH) $(VLA) train-student --teacher $(DCLIP_RUNS)/teacher --out $(@D) \
	  --recipe $(DCLIP_RECIPES)/train-student-noteacher.yaml --set 'eval.sets=[]' --force $(VLA_FLAGS)

$(DCLIP_ABL)/eval/manifest.json: $(DCLIP_RUNS)/student/manifest.json $(DCLIP_ARMS:%=$(DCLIP_ABL)/student-%/manifest.json) \
                                 $(CLIP_DEP) $(DCLIP_RECIPES)/eval.yaml
	$(VLA) eval $(CLIP) $(DCLIP_RUNS)/student $(DCLIP_ARMS:%=$(DCLIP_ABL)/student-%) --data $(EVAL) --out $(@D) \
	  --recipe $(DCLIP_RECIPES)/eval.yaml --force $(VLA_FLAGS)

# Claim (c): one student trained for several epochs from the full arm's teacher, scored on the val
# split before training and after every epoch: the table (epochs.md) and the plot (epochs.png).
DCLIP_EPOCHS_PAGE ?= $(if $(filter runs/dclip,$(DCLIP_RUNS)),docs/results/dclip-epochs.md)
dclip-epochs: $(DCLIP_ABL)/student-epochs/manifest.json
	@echo; echo "DCLIP student by epoch ($(DCLIP_ABL)/student-epochs/epochs.png):"
	@cat $(DCLIP_ABL)/student-epochs/epochs.md
	$(if $(DCLIP_EPOCHS_PAGE),$(DOCS) epochs dclip-epochs $(DCLIP_ABL)/student-epochs --make 'make dclip-epochs' \
	  --out $(DCLIP_EPOCHS_PAGE),@true)

$(DCLIP_ABL)/student-epochs/manifest.json: $(DCLIP_RUNS)/teacher/manifest.json $(DCLIP_RECIPES)/train-student-epochs.yaml | $(STAMP)
	$(LAUNCH) $(VLA) train-student --teacher $(DCLIP_RUNS)/teacher --out $(@D) \
	  --recipe $(DCLIP_RECIPES)/train-student-epochs.yaml --force $(VLA_FLAGS)

# The teachers themselves as retrieval models on held-out images (the val split): each arm's
# teacher — at the epoch its student recipe distils — scores every (caption, image) pair by
# cos(teacher(x, T), u_T), beside the base CLIP on the same images and captions (`vla eval-teacher`).
# Regions of the val images come from the same detector as each teacher's (YOLO; oracle boxes).
DCLIP_VAL_DATA ?= $(DATA)
DCLIP_TEACHERS_PAGE ?= $(if $(filter runs/dclip,$(DCLIP_RUNS)),docs/results/dclip-teachers.md)
.PHONY: dclip-teachers dclip-sweep dclip-seeds
dclip-teachers: $(DCLIP_ABL)/teachers/manifest.json
	@echo; echo "DCLIP teachers as retrieval models ($(DCLIP_ABL)/teachers):"
	@sed -n '3,/^## /p' $(DCLIP_ABL)/teachers/results.md | grep '^|'
	$(call results_page,dclip-teachers,$(DCLIP_ABL)/teachers,make dclip-teachers,$(DCLIP_TEACHERS_PAGE))

$(DCLIP_ABL)/regions-val/manifest.json: $(DATA_DEP) $(CLIP_DEP) $(DETECTOR_DEP) $(DCLIP_RECIPES)/precompute-regions.yaml | $(STAMP)
	$(VLA) precompute-regions --data $(DCLIP_VAL_DATA) --detector $(DETECTOR) --clip $(CLIP) --out $(@D) \
	  --recipe $(DCLIP_RECIPES)/precompute-regions.yaml --set split=val --force $(VLA_FLAGS)

$(DCLIP_ABL)/regions-oracle-val/manifest.json: $(DATA_DEP) $(CLIP_DEP) $(DCLIP_RECIPES)/precompute-regions.yaml | $(STAMP)
	$(VLA) precompute-regions --data $(DCLIP_VAL_DATA) --detector oracle --clip $(CLIP) --out $(@D) \
	  --recipe $(DCLIP_RECIPES)/precompute-regions.yaml --set split=val --force $(VLA_FLAGS)

# which arms' teachers (full oracle noregions average converged negatives), each at the epoch its student distils
DCLIP_TEACHER_ARMS ?= full oracle noregions average converged negatives
dclip_teacher_dir = $(if $(filter full,$(1)),$(DCLIP_RUNS)/teacher,$(DCLIP_ABL)/teacher-$(1))
dclip_teacher_epoch = $(shell sed -n 's/^teacher_epoch: *//p' \
  $(DCLIP_RECIPES)/$(if $(filter converged,$(1)),train-student-converged,train-student).yaml)
DCLIP_VAL_REGIONS := $(DCLIP_ABL)/regions-val $(if $(filter oracle,$(DCLIP_TEACHER_ARMS)),$(DCLIP_ABL)/regions-oracle-val)
$(DCLIP_ABL)/teachers/manifest.json: $(foreach a,$(DCLIP_TEACHER_ARMS),$(call dclip_teacher_dir,$(a))/manifest.json) \
                                     $(DCLIP_VAL_REGIONS:%=%/manifest.json) $(DCLIP_RECIPES)/eval-teacher.yaml | $(STAMP)
	$(VLA) eval-teacher $(foreach a,$(DCLIP_TEACHER_ARMS),$(call dclip_teacher_dir,$(a)):$(call dclip_teacher_epoch,$(a))) \
	  $(DCLIP_VAL_REGIONS:%=--regions %) --out $(@D) --recipe $(DCLIP_RECIPES)/eval-teacher.yaml --force $(VLA_FLAGS)

# The student budget and distill_weight, chosen on the val split: the full arm's student for each
# DCLIP_SWEEP_WEIGHTS × DCLIP_SWEEP_EPOCHS (train-student-sweep.yaml: train-student.yaml's batch,
# learning rate and teacher epoch), scored on val after its last epoch; one table.
DCLIP_SWEEP_WEIGHTS ?= 0.5 1 2
DCLIP_SWEEP_EPOCHS ?= 2 4
DCLIP_SWEEP_PAGE ?= $(if $(filter runs/dclip,$(DCLIP_RUNS)),docs/results/dclip-sweep.md)
DCLIP_SWEEP := $(foreach w,$(DCLIP_SWEEP_WEIGHTS),$(foreach e,$(DCLIP_SWEEP_EPOCHS),$(DCLIP_ABL)/sweep/student-w$(w)-e$(e)))
dclip-sweep: $(DCLIP_SWEEP:%=%/manifest.json)
	@echo; echo "DCLIP student sweep on the val split ($(DCLIP_ABL)/sweep)"
	$(if $(DCLIP_SWEEP_PAGE),$(DOCS) sweep dclip-sweep $(DCLIP_SWEEP) --make 'make dclip-sweep' --out $(DCLIP_SWEEP_PAGE),@true)

$(DCLIP_ABL)/sweep/student-w%/manifest.json: $(DCLIP_RUNS)/teacher/manifest.json $(DCLIP_RECIPES)/train-student-sweep.yaml | $(STAMP)
	$(LAUNCH) $(VLA) train-student --teacher $(DCLIP_RUNS)/teacher --out $(@D) --recipe $(DCLIP_RECIPES)/train-student-sweep.yaml \
	  --set distill_weight=$(word 1,$(subst -e, ,$*)) --set epochs=$(word 2,$(subst -e, ,$*)) --force $(VLA_FLAGS)

# A second seed (train.seed=1) of the full arm (teacher and student) and of the no-teacher arm, at
# the recipes' setting, scored on the test split beside the first seed's (`make dclip-ablations`).
DCLIP_SEEDS_PAGE ?= $(if $(filter runs/dclip,$(DCLIP_RUNS)),docs/results/dclip-seeds.md)
DCLIP_SEED_STUDENTS := $(DCLIP_RUNS)/student $(DCLIP_ABL)/student-noteacher $(DCLIP_ABL)/student-seed1 $(DCLIP_ABL)/student-noteacher-seed1
dclip-seeds: $(DCLIP_ABL)/seeds-eval/manifest.json
	@echo; echo "DCLIP, two seeds of the full and no-teacher arms:"; cat $(DCLIP_ABL)/seeds-eval/results.md
	$(call results_page,dclip-seeds,$(DCLIP_ABL)/seeds-eval,make dclip-seeds,$(DCLIP_SEEDS_PAGE))

$(DCLIP_ABL)/teacher-seed1/manifest.json: $(DCLIP_RUNS)/regions/manifest.json $(DCLIP_RECIPES)/train-teacher.yaml | $(STAMP)
	$(LAUNCH) $(VLA) train-teacher --regions $(DCLIP_RUNS)/regions --out $(@D) \
	  --recipe $(DCLIP_RECIPES)/train-teacher.yaml --set train.seed=1 --force $(VLA_FLAGS)

$(DCLIP_ABL)/student-seed1/manifest.json: $(DCLIP_ABL)/teacher-seed1/manifest.json $(DCLIP_RECIPES)/train-student.yaml | $(STAMP)
	$(LAUNCH) $(VLA) train-student --teacher $(DCLIP_ABL)/teacher-seed1 --out $(@D) \
	  --recipe $(DCLIP_RECIPES)/train-student.yaml --set train.seed=1 --set 'eval.sets=[]' --force $(VLA_FLAGS)

$(DCLIP_ABL)/student-noteacher-seed1/manifest.json: $(DCLIP_RUNS)/teacher/manifest.json $(DCLIP_RECIPES)/train-student-noteacher.yaml | $(STAMP)
	$(LAUNCH) $(VLA) train-student --teacher $(DCLIP_RUNS)/teacher --out $(@D) \
	  --recipe $(DCLIP_RECIPES)/train-student-noteacher.yaml --set train.seed=1 --set 'eval.sets=[]' --force $(VLA_FLAGS)

$(DCLIP_ABL)/seeds-eval/manifest.json: $(DCLIP_SEED_STUDENTS:%=%/manifest.json) $(CLIP_DEP) $(DCLIP_RECIPES)/eval.yaml
	$(VLA) eval $(CLIP) $(DCLIP_SEED_STUDENTS) --data $(EVAL) --out $(@D) \
	  --recipe $(DCLIP_RECIPES)/eval.yaml --set 'sets=[retrieval,zeroshot]' --force $(VLA_FLAGS)

# ---- the MM-GEM curriculum --------------------------------------------------------------
# Embedded default (no arguments): the same world and base CLIP as `make proclip` (built once,
# shared) → joint-train (stage 1, the base CLIP's image tower + a tiny Llama) → stage2-roi →
# the same-budget ablation arms (joint-train with objective embed, caption) → eval of the base
# CLIP, stage 1, stage 2 and both arms side by side → export of stage 2.
# Real models on 8 GPUs:
#   make mmgem NPROC=8 VISION=clip-vit-l LLM=tinyllama DATA='/data/shards/{00000..00999}.tar' \
#              EVAL=/data/evalsets RECIPES=recipes/gpu MMGEM_RUNS=runs/mmgem-vitl
MMGEM_RUNS ?= runs/mmgem
MMGEM_RECIPES ?= $(RECIPES)/mmgem
MMGEM_EXPORT ?= exports/$(notdir $(MMGEM_RUNS))
MMGEM_PAGE ?= $(if $(filter runs/mmgem,$(MMGEM_RUNS)),docs/results/mmgem.md)
# with no VISION, MM-GEM starts from the base CLIP `make proclip` pre-trains (the same file target)
ifeq ($(origin VISION),undefined)
VISION := $(RUNS)/clip
VISION_DEP := $(RUNS)/clip/manifest.json
endif
# with no LLM, the embedded tiny Llama pre-trained as a causal LM on the world's captions
# (`vla pretrain-lm`, built once and shared by the joint, embed-only and caption-only arms), as the
# paper starts from TinyLlama; LLM=tinyllama (or a directory, hub id) starts from that LM instead
ifeq ($(origin LLM)$(wildcard $(MMGEM_RECIPES)/pretrain-lm.yaml),undefined$(MMGEM_RECIPES)/pretrain-lm.yaml)
LLM := $(MMGEM_RUNS)/lm
LLM_DEP := $(MMGEM_RUNS)/lm/manifest.json
endif
LLM_FLAG := $(if $(LLM),--llm $(LLM),)
MMGEM_ARMS := $(MMGEM_RUNS)/joint $(MMGEM_RUNS)/stage2 $(MMGEM_RUNS)/embed-only $(MMGEM_RUNS)/caption-only

.PHONY: mmgem
mmgem: $(MMGEM_EXPORT)/manifest.json
	@$(VLA) inspect $(MMGEM_RUNS)/eval >/dev/null
	@echo; echo "MM-GEM curriculum ($(MMGEM_RUNS)) — evaluation:"; cat $(MMGEM_RUNS)/eval/results.md
	$(call results_page,mmgem,$(MMGEM_RUNS)/eval,make mmgem,$(MMGEM_PAGE))

$(MMGEM_RUNS)/joint/manifest.json: $(DATA_DEP) $(VISION_DEP) $(LLM_DEP) $(MMGEM_RECIPES)/joint-train.yaml | $(STAMP)
	$(LAUNCH) $(VLA) joint-train --data '$(DATA)' --vision $(VISION) $(LLM_FLAG) --out $(MMGEM_RUNS)/joint \
	  --recipe $(MMGEM_RECIPES)/joint-train.yaml --force $(VLA_FLAGS)

$(MMGEM_RUNS)/lm/manifest.json: $(DATA_DEP) $(MMGEM_RECIPES)/pretrain-lm.yaml | $(STAMP)
	$(LAUNCH) $(VLA) pretrain-lm --data '$(DATA)' --out $(MMGEM_RUNS)/lm --recipe $(MMGEM_RECIPES)/pretrain-lm.yaml \
	  --force $(VLA_FLAGS)

$(MMGEM_RUNS)/stage2/manifest.json: $(MMGEM_RUNS)/joint/manifest.json $(MMGEM_RECIPES)/stage2-roi.yaml | $(STAMP)
	$(LAUNCH) $(VLA) stage2-roi --data '$(DATA)' --init $(MMGEM_RUNS)/joint --out $(MMGEM_RUNS)/stage2 \
	  --recipe $(MMGEM_RECIPES)/stage2-roi.yaml --force $(VLA_FLAGS)

# the ablation arms: stage 1 with one term, at stage 1's budget (their recipes differ only in objective)
$(MMGEM_RUNS)/embed-only/manifest.json: $(DATA_DEP) $(VISION_DEP) $(LLM_DEP) $(MMGEM_RECIPES)/joint-train-embed.yaml | $(STAMP)
	$(LAUNCH) $(VLA) joint-train --data '$(DATA)' --vision $(VISION) $(LLM_FLAG) --out $(MMGEM_RUNS)/embed-only \
	  --recipe $(MMGEM_RECIPES)/joint-train-embed.yaml --force $(VLA_FLAGS)

$(MMGEM_RUNS)/caption-only/manifest.json: $(DATA_DEP) $(VISION_DEP) $(LLM_DEP) $(MMGEM_RECIPES)/joint-train-caption.yaml | $(STAMP)
	$(LAUNCH) $(VLA) joint-train --data '$(DATA)' --vision $(VISION) $(LLM_FLAG) --out $(MMGEM_RUNS)/caption-only \
	  --recipe $(MMGEM_RECIPES)/joint-train-caption.yaml --force $(VLA_FLAGS)

$(MMGEM_RUNS)/eval/manifest.json: $(addsuffix /manifest.json,$(MMGEM_ARMS)) $(VISION_DEP) $(MMGEM_RECIPES)/eval-mmgem.yaml
	$(VLA) eval $(VISION) $(MMGEM_ARMS) --data '$(EVAL)' --out $(MMGEM_RUNS)/eval \
	  --recipe $(MMGEM_RECIPES)/eval-mmgem.yaml --force $(VLA_FLAGS)

$(MMGEM_EXPORT)/manifest.json: $(MMGEM_RUNS)/stage2/manifest.json $(MMGEM_RUNS)/eval/manifest.json
	$(VLA) export $(MMGEM_RUNS)/stage2 --out $(MMGEM_EXPORT) --force

# ---- MM-GEM's choices, on the val split --------------------------------------------------------
# `make mmgem-sweep`: make mmgem's stage-1 arms and stage 2 (the recipes' settings), stage 1 at the
# other gen_weight values, a second seed of joint and embed-only (the seed spread), and stage 2 on
# regions only (image_captions off; the recipes mix image captions in), all scored by `vla eval` on the world's val split (split: val; the test
# split only reports, in make mmgem) → docs/results/mmgem-sweep.md. MMGEM_GEN_WEIGHTS lists the
# gen_weight values besides joint-train.yaml's own (that one is $(MMGEM_RUNS)/joint); MMGEM_SEED2=
# (empty) leaves out the second seed.
MMGEM_SWEEP ?= $(MMGEM_RUNS)-sweep
MMGEM_GEN_WEIGHTS ?= 1
MMGEM_SEED2 ?= 1
MMGEM_SWEEP_PAGE ?= $(if $(filter runs/mmgem,$(MMGEM_RUNS)),docs/results/mmgem-sweep.md)
MMGEM_SWEEP_ARMS := $(MMGEM_RUNS)/joint $(MMGEM_RUNS)/embed-only $(MMGEM_RUNS)/caption-only \
  $(foreach w,$(MMGEM_GEN_WEIGHTS),$(MMGEM_SWEEP)/joint-gen$(w)) $(MMGEM_RUNS)/stage2 $(MMGEM_SWEEP)/stage2-regions-only \
  $(if $(MMGEM_SEED2),$(MMGEM_SWEEP)/joint-seed$(MMGEM_SEED2) $(MMGEM_SWEEP)/embed-only-seed$(MMGEM_SEED2))

.PHONY: mmgem-sweep
mmgem-sweep: $(MMGEM_SWEEP)/eval/manifest.json
	@$(VLA) inspect $(MMGEM_SWEEP)/eval >/dev/null
	@echo; echo "MM-GEM choices ($(MMGEM_SWEEP)) on the val split:"; cat $(MMGEM_SWEEP)/eval/results.md
	$(call results_page,mmgem-sweep,$(MMGEM_SWEEP)/eval,make mmgem-sweep,$(MMGEM_SWEEP_PAGE))

$(MMGEM_SWEEP)/joint-gen%/manifest.json: $(DATA_DEP) $(VISION_DEP) $(LLM_DEP) $(MMGEM_RECIPES)/joint-train.yaml | $(STAMP)
	$(LAUNCH) $(VLA) joint-train --data '$(DATA)' --vision $(VISION) $(LLM_FLAG) --out $(@D) \
	  --recipe $(MMGEM_RECIPES)/joint-train.yaml --set gen_weight=$* --force $(VLA_FLAGS)

$(MMGEM_SWEEP)/joint-seed$(MMGEM_SEED2)/manifest.json: $(DATA_DEP) $(VISION_DEP) $(LLM_DEP) $(MMGEM_RECIPES)/joint-train.yaml | $(STAMP)
	$(LAUNCH) $(VLA) joint-train --data '$(DATA)' --vision $(VISION) $(LLM_FLAG) --out $(@D) \
	  --recipe $(MMGEM_RECIPES)/joint-train.yaml --set train.seed=$(MMGEM_SEED2) --force $(VLA_FLAGS)

$(MMGEM_SWEEP)/embed-only-seed$(MMGEM_SEED2)/manifest.json: $(DATA_DEP) $(VISION_DEP) $(LLM_DEP) $(MMGEM_RECIPES)/joint-train-embed.yaml | $(STAMP)
	$(LAUNCH) $(VLA) joint-train --data '$(DATA)' --vision $(VISION) $(LLM_FLAG) --out $(@D) \
	  --recipe $(MMGEM_RECIPES)/joint-train-embed.yaml --set train.seed=$(MMGEM_SEED2) --force $(VLA_FLAGS)

$(MMGEM_SWEEP)/stage2-regions-only/manifest.json: $(MMGEM_RUNS)/joint/manifest.json $(MMGEM_RECIPES)/stage2-roi.yaml | $(STAMP)
	$(LAUNCH) $(VLA) stage2-roi --data '$(DATA)' --init $(MMGEM_RUNS)/joint --out $(@D) \
	  --recipe $(MMGEM_RECIPES)/stage2-roi.yaml --set image_captions=false --force $(VLA_FLAGS)

$(MMGEM_SWEEP)/eval/manifest.json: $(addsuffix /manifest.json,$(MMGEM_SWEEP_ARMS)) $(MMGEM_RECIPES)/eval-mmgem.yaml
	$(VLA) eval $(MMGEM_SWEEP_ARMS) --data '$(DATA)' --out $(@D) \
	  --recipe $(MMGEM_RECIPES)/eval-mmgem.yaml --set split=val --force $(VLA_FLAGS)

.PHONY: install test bench gpu-check clean help
help:
	@echo "make install   create .venv with everything vla needs"
	@echo "make test      install (if needed) and run the test suite (offline, CPU)"
	@echo "make proclip   the ProCLIP curriculum on the embedded synthetic world"
	@echo "make dclip     the DCLIP curriculum on the same world and base CLIP"
	@echo "make dclip-ablations  DCLIP's ablation arms side by side (same student budget); make dclip-epochs: claim (c)"
	@echo "make dclip-teachers   DCLIP's teachers as retrieval models on val; dclip-sweep: the student budget and"
	@echo "               distill_weight on val; dclip-seeds: a second seed of the full and no-teacher arms"
	@echo "make mmgem     the MM-GEM curriculum (joint-train, stage2-roi, ablation arms) on the same world and base CLIP"
	@echo "make mmgem-sweep  MM-GEM's choices on the val split (gen_weight, a second seed, stage 2 with image captions)"
	@echo "make bench     throughput / cache / retrieval-eval benchmarks"
	@echo "make gpu-check on a GPU machine: CUDA tests, 3 bf16 curricula, torchrun/NCCL + 2-GPU invariance, compile, MFU, every real recipe step (docs/gpus.md)"

install: $(STAMP)

# torch 2.14.1 pairs with torchvision 0.29.1 on these machines (see docs/architecture.md);
# opencv-contrib-python-headless must come after ultralytics' opencv-python (same cv2 folder).
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e '.[test,embedders,logging]'
	$(BIN)/pip install -q opencv-contrib-python-headless
	# CLIP_benchmark for the test that checks `vla eval` against it: --no-deps, as everything
	# its metrics import is here already except pycocoevalcap (pure Python for Bleu/Cider)
	$(BIN)/pip install -q --no-deps clip-benchmark==1.6.2 pycocoevalcap==1.2
	# java runs pycocoevalcap's PTBTokenizer, which `vla eval` tokenises captions with (without it:
	# the pure-Python tokenizer, see docs/mmgem.md)
	command -v java >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq default-jre-headless; } \
	  || echo "warning: java could not be installed; captioning metrics use the pure-Python PTB tokenizer"
	touch $@

test: $(STAMP)
	$(BIN)/python -m pytest -q

# figures and ratios side by side (bench/results.json); BENCH_FLAGS="--quick" or "--only a,c"
bench: $(STAMP)
	$(BIN)/python -m vla.bench $(BENCH_FLAGS)
	$(DOCS) bench && $(DOCS) readme

# the checks only a GPU can make (see vla/gpucheck/); without a GPU it says so and exits 0.
# GPU_CHECK_FLAGS="--device cpu" self-tests the script at tiny sizes on the CPU.
gpu-check: $(STAMP)
	$(BIN)/python -m vla.gpucheck $(GPU_CHECK_FLAGS)

clean:
	rm -rf runs data bench .yolo

# /etc/profile.d/pggan-venv.sh in the image (deploy/Dockerfile). A login shell (`bash -l`, as KubeRay runs Ray
# when its operator has ENABLE_LOGIN_SHELL=true) reads /etc/profile, which on Debian resets PATH and drops the
# image's virtualenv: put it back in front, once.
case ":${PATH}:" in
  *:/opt/venv/bin:*) ;;
  *) PATH="/opt/venv/bin:${PATH}"; export PATH ;;
esac
